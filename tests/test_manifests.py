"""The Kubernetes and KServe manifests, checked offline: against the Kubernetes schemas that
kubernetes-validate ships, and against the service they deploy."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "deploy" / "kubernetes"
KSERVE = REPO / "deploy" / "kserve" / "inferenceservice.yaml"
# The oldest Kubernetes still supported upstream when this was written, and the newest schema
# the package ships.
VERSIONS = ("1.32.0", kubernetes_validate.latest_version())


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def base_resources() -> dict[str, dict]:
    kustomization = load(BASE / "kustomization.yaml")[0]
    resources = {}
    for name in kustomization["resources"]:
        path = BASE / name
        assert path.is_file(), f"{name} is listed in the kustomization but does not exist"
        for doc in load(path):
            resources[doc["kind"]] = doc
    return resources


def with_kustomize_labels(resource: dict) -> dict:
    """What kustomize's ``labels`` (includeSelectors) does to selectors and pod labels."""
    labels = load(BASE / "kustomization.yaml")[0]["labels"][0]["pairs"]
    resource = yaml.safe_load(yaml.safe_dump(resource))
    spec = resource.get("spec", {})
    if "selector" in spec:
        if "matchLabels" in spec["selector"]:
            spec["selector"]["matchLabels"].update(labels)
        else:
            spec["selector"].update(labels)
    if "template" in spec:
        spec["template"]["metadata"]["labels"].update(labels)
    return resource


@pytest.mark.parametrize("version", VERSIONS)
def test_every_resource_of_the_base_is_valid_kubernetes(version):
    resources = base_resources()
    assert set(resources) == {"Deployment", "Service", "HorizontalPodAutoscaler",
                              "PodDisruptionBudget"}
    for resource in resources.values():
        kubernetes_validate.validate(with_kustomize_labels(resource), version, strict=True)


def test_a_broken_manifest_is_caught():
    deployment = base_resources()["Deployment"]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def container(resource: dict) -> dict:
    return resource["spec"]["template"]["spec"]["containers"][0]


def env_of(spec: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in spec.get("env", [])}


def assert_real_settings(env: dict[str, str]) -> None:
    """Every EMOTION_ variable names a setting, and the settings take its value. Settings
    ignore unknown names, so a misspelt one would otherwise pass as the default."""
    given = {k.removeprefix("EMOTION_").lower(): v for k, v in env.items()
             if k.startswith("EMOTION_")}
    assert given and set(given) <= set(Settings.model_fields), set(given) - set(
        Settings.model_fields)
    Settings(**given)


def test_the_deployment_runs_the_service_as_its_settings_expect():
    deployment = base_resources()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    api = container(deployment)
    env = env_of(api)
    # Workers matched to the CPU limit; requests equal limits (Guaranteed QoS).
    assert int(env["EMOTION_WORKERS"]) == int(api["resources"]["limits"]["cpu"])
    assert api["resources"]["requests"] == api["resources"]["limits"]
    assert_real_settings(env)
    # Non-root, read-only root filesystem, the metrics folder on an emptyDir.
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert pod["enableServiceLinks"] is False  # no <SERVICE>_PORT variables among EMOTION_*
    assert api["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in api["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[env["PROMETHEUS_MULTIPROC_DIR"]]]
    # Probes on routes the service has, through the port it listens on.
    routes = set(create_app(Settings()).openapi()["paths"])
    port_names = {p["name"]: p["containerPort"] for p in api["ports"]}
    # the port from the setting, so an overlay moving EMOTION_PORT moves the listener too
    assert "args" not in api and env["EMOTION_PORT"] == str(port_names["http"])
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        assert api[probe]["httpGet"]["path"] == path and path in routes
        assert api[probe]["httpGet"]["port"] in port_names
    # Drain: the pause, the in-app drain and the shutdown timeout fit in the grace period.
    pause = int(api["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(env["EMOTION_DRAIN_SECONDS"]) + float(env["EMOTION_SHUTDOWN_TIMEOUT_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > pause + drain
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"]  # the HPA's to set


def test_service_hpa_and_budget_select_the_deployments_pods():
    resources = {k: with_kustomize_labels(v) for k, v in base_resources().items()}
    pod_labels = resources["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for kind, selector in (("Service", resources["Service"]["spec"]["selector"]),
                           ("PodDisruptionBudget",
                            resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])):
        assert selector.items() <= pod_labels.items(), kind
    target = resources["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment",
                                                resources["Deployment"]["metadata"]["name"])
    assert resources["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2  # the PDB allows 1
    service_port = resources["Service"]["spec"]["ports"][0]
    assert service_port["targetPort"] in {p["name"] for p in container(resources["Deployment"])[
        "ports"]}


def test_the_optional_service_monitor_scrapes_the_service():
    folder = BASE / "components" / "servicemonitor"
    component = load(folder / "kustomization.yaml")[0]
    assert component["kind"] == "Component"
    for name in component["resources"]:
        assert (folder / name).is_file()
    monitor = load(folder / "servicemonitor.yaml")[0]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = base_resources()["Service"]
    labels = load(BASE / "kustomization.yaml")[0]["labels"][0]["pairs"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("version", VERSIONS)
def test_the_kserve_predictor_is_a_valid_pod_on_the_v2_protocol(version):
    """KServe's CRD schema is not shipped with kubernetes-validate; its predictor's containers
    and volumes are core Kubernetes objects, so they are checked as a Pod."""
    service, budget = load(KSERVE)
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1",
                                                        "InferenceService")
    predictor = service["spec"]["predictor"]
    # The predictor is a PodSpec inline, plus KServe's own scaling fields.
    kserve_fields = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
           "spec": {k: v for k, v in predictor.items() if k not in kserve_fields}}
    kubernetes_validate.validate(pod, version, strict=True)
    kubernetes_validate.validate(budget, version, strict=True)
    assert budget["kind"] == "PodDisruptionBudget"
    assert budget["spec"]["selector"]["matchLabels"] == {  # the label KServe gives its pods
        "serving.kserve.io/inferenceservice": service["metadata"]["name"]}
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    assert pod["spec"]["enableServiceLinks"] is False
    api = predictor["containers"][0]
    routes = set(create_app(Settings()).openapi()["paths"])
    assert api["name"] == "kserve-container" and api["ports"][0]["containerPort"] == 8080
    assert "args" not in api and env_of(api)["EMOTION_PORT"] == "8080"  # see the Dockerfile
    # Scraped where it listens: KServe's own switch, on, rewrites the port to its queue-proxy's
    # (9091; none runs in a RawDeployment), as its pod webhook does (metrics_aggregate_injector).
    notes = service["metadata"]["annotations"]
    assert notes["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert notes["serving.kserve.io/enable-prometheus-scraping"] == "false"
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(api["ports"][0]["containerPort"])
    assert notes["prometheus.io/path"] in routes
    assert predictor["minReplicas"] >= 2  # the PDB allows 1
    assert api["resources"]["requests"] == api["resources"]["limits"]  # Guaranteed QoS
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["path"] in routes
        assert api[probe]["httpGet"]["path"].startswith("/v2/health/")
    env = env_of(api)
    assert env["PROTOCOL"] == "v2"  # KServe takes a custom predictor without it for v1
    assert_real_settings(env)
    assert int(env["EMOTION_WORKERS"]) == int(api["resources"]["limits"]["cpu"])
    pause = int(api["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(env["EMOTION_DRAIN_SECONDS"]) + float(env["EMOTION_SHUTDOWN_TIMEOUT_SECONDS"])
    assert predictor["terminationGracePeriodSeconds"] > pause + drain
