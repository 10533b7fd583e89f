"""Faces in a photo, for ``faces=auto|all``: the ``face_crop.json`` format (``spec``), the
MTCNN detector (``detector``) and the cropper that frames each face as the training crops
are (``cropper``)."""

from service.faces.cropper import FaceCropper, crop_region
from service.faces.detector import FaceDetector, non_max_suppression
from service.faces.spec import (
    FACE_CROP_FILE,
    STAGES,
    Box,
    CropGeometry,
    DetectorConfig,
    FaceCropSpec,
    NetworkFile,
    face_crop_entry,
    load_face_crop,
    load_verified_face_crop,
)

__all__ = ["FACE_CROP_FILE", "STAGES", "Box", "CropGeometry", "DetectorConfig", "FaceCropSpec",
           "FaceCropper", "FaceDetector", "NetworkFile", "crop_region", "face_crop_entry",
           "load_face_crop", "load_verified_face_crop", "non_max_suppression"]
