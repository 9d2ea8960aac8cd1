"""deploy/kubernetes, offline: every object against the Kubernetes API's own models, and against runnerd's own rules.

The models are the official Python client's (``kubernetes.client.models``,
generated from the API's OpenAPI schema): a field that is misspelled or in
the wrong place is not an attribute of the model it sits in, and fails here,
as would a missing required field (the models' own checks, through the
client's deserializer). Then what the manifests must agree on with runnerd:
the ConfigMap is a config runnerd loads; the grace period fits the drain;
the resources follow the concurrency, the policy's job limit and the
session budget; ports, probes and mounts name what the config names.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from runnerd import config as config_mod
from runnerd.sandbox import policy

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "date": str}
# The memory a pod keeps beside its jobs and sessions: the daemon and its zygotes (README: warm mode's memory).
DAEMON_MEMORY = 1 << 30
# terminationGracePeriodSeconds and the unit's TimeoutStopSec: the drain (shutdown_grace_s) plus this.
STOP_MARGIN_S = 15


def models() -> Any:
    import kubernetes.client.models as m

    return m


def strict(obj: Any, type_name: str, where: str) -> list[str]:
    """What in *obj* is not *type_name* of the API: unknown fields and wrong types, each with its path."""
    if type_name == "object":
        return []
    if type_name in PRIMITIVES:
        ok = isinstance(obj, PRIMITIVES[type_name]) and not (type_name != "bool" and isinstance(obj, bool))
        return [] if ok else [f"{where}: {obj!r} is not a {type_name}"]
    if inner := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(obj, list):
            return [f"{where}: not a list"]
        return [e for i, item in enumerate(obj) for e in strict(item, inner.group(1), f"{where}[{i}]")]
    if inner := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        if not isinstance(obj, dict):
            return [f"{where}: not a map"]
        return [e for k, v in obj.items() for e in strict(v, inner.group(1), f"{where}.{k}")]
    cls = getattr(models(), type_name)
    if not isinstance(obj, dict):
        return [f"{where}: not a {type_name}"]
    fields = {wire: attr for attr, wire in cls.attribute_map.items()}
    errors = []
    for key, value in obj.items():
        if key not in fields:
            errors.append(f"{where}.{key}: not a field of {type_name} (fields: {', '.join(sorted(fields))})")
        else:
            errors += strict(value, cls.openapi_types[fields[key]], f"{where}.{key}")
    return errors


def model_name(doc: dict[str, Any]) -> str:
    group_version, kind = doc["apiVersion"], doc["kind"]
    version = group_version.split("/")[-1]
    return version[0].upper() + version[1:] + kind


def deserialize(doc: dict[str, Any], name: str) -> Any:
    """The client's own deserializer (its models check required fields)."""
    from kubernetes.client import ApiClient

    class Response:
        data = json.dumps(doc)

    return ApiClient().deserialize(Response(), name)


def manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_every_object_is_what_the_api_accepts():
    docs = manifests()
    assert set(docs) == {"ConfigMap", "DaemonSet", "Service"}
    for kind, doc in docs.items():
        name = model_name(doc)
        assert strict(doc, name, kind) == []
        assert deserialize(doc, name).metadata.name.startswith("runnerd")


def test_a_misplaced_or_misspelled_field_fails():
    ds = manifests()["DaemonSet"]
    container = ds["spec"]["template"]["spec"]["containers"][0]
    misplaced = json.loads(json.dumps(ds))
    misplaced["spec"]["template"]["spec"]["containers"][0]["terminationGracePeriodSeconds"] = 45  # the pod's
    assert any("terminationGracePeriodSeconds: not a field of V1Container" in e
               for e in strict(misplaced, "V1DaemonSet", "DaemonSet"))  # fmt: skip
    typo = json.loads(json.dumps(ds))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = container["readinessProbe"]
    assert any("readinesProbe" in e for e in strict(typo, "V1DaemonSet", "DaemonSet"))
    wrong = json.loads(json.dumps(ds))
    wrong["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = "yes"
    assert any("'yes' is not a bool" in e for e in strict(wrong, "V1DaemonSet", "DaemonSet"))
    missing = json.loads(json.dumps(ds))
    del missing["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        deserialize(missing, "V1DaemonSet")


def test_the_kustomization_names_the_objects_and_the_image():
    from deploy.image import NAME

    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    ds = manifests()["DaemonSet"]
    image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{NAME}:latest" and k["images"][0]["name"] == NAME


def loaded_config(tmp_path: Path) -> tuple[config_mod.Config, dict[str, Any]]:
    text = manifests()["ConfigMap"]["data"]["runnerd.toml"]
    path = tmp_path / "runnerd.toml"
    path.write_text(text)
    return config_mod.load(path), tomllib.loads(text)


def quantity(value: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "": 1}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|)", value)
    assert m, value
    return int(m.group(1)) * units[m.group(2)]


def test_the_manifests_agree_with_runnerd(tmp_path):
    cfg, raw = loaded_config(tmp_path)  # runnerd's own loader takes it
    docs = manifests()
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]

    # The drain fits in the grace period, as in the systemd unit.
    unit = (ROOT / "systemd" / "runnerd.service").read_text()
    timeout_stop = int(re.search(r"(?m)^TimeoutStopSec=(\d+)s$", unit).group(1))
    assert timeout_stop == config_mod.Config().shutdown_grace_s + STOP_MARGIN_S
    assert pod["terminationGracePeriodSeconds"] == cfg.shutdown_grace_s + STOP_MARGIN_S

    # Resources: the CPUs for the slots, and memory for every job at its limit, the sessions' budget and the daemon.
    job = policy.load(cfg.policy or config_mod.default_policy_path()).limits.memory_bytes
    want = cfg.concurrency * job + cfg.session_memory_budget + DAEMON_MEMORY
    res = container["resources"]
    assert res["requests"] == res["limits"], "requests = limits: the pod's QoS is Guaranteed"
    assert quantity(res["limits"]["memory"]) == want, (res, want)
    assert int(res["limits"]["cpu"]) == cfg.concurrency

    # Ports: the tcp bind and the metrics port are the container's, and the Service's targets.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    tcp = [b for b in cfg.bind if b.startswith("tcp://")]
    assert [int(b.rsplit(":", 1)[1]) for b in tcp] == [ports["runnerd"]] and cfg.metrics_port == ports["metrics"]
    svc = docs["Service"]["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is False
    assert svc["selector"].items() <= docs["DaemonSet"]["spec"]["template"]["metadata"]["labels"].items()
    assert {p["targetPort"] for p in svc["ports"]} == set(ports)

    # Probes ask the daemon's own ipc endpoint; readiness fails while it drains.
    (ipc,) = [b for b in cfg.bind if b.startswith("ipc://")]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["runnerd", "ping"] and command[command.index("--endpoint") + 1] == ipc, probe
        assert ("--ready" in command) == (probe == "readinessProbe"), probe
        timeout = float(command[command.index("--timeout") + 1])
        assert timeout < container[probe]["timeoutSeconds"], probe  # the command gives up before the kubelet

    # Mounts: the config file, the CURVE key and clients, the state dir and the socket's dir.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_arg = container["args"][container["args"].index("--config") + 1]
    assert str(Path(config_arg).parent) in mounts
    assert cfg.curve_server_key is not None and cfg.curve_clients_dir is not None
    assert str(cfg.curve_server_key.parent) in mounts and str(cfg.curve_clients_dir) in mounts
    assert str(cfg.state_dir) in mounts and str(Path(ipc.removeprefix("ipc://")).parent) in mounts
    assert not any(str(cfg.sandbox_env).startswith(path) for path in mounts), "the env is the image's"
    assert raw["mode"] in ("cold", "warm")
    # The jobs in the pod's own cgroup, whatever cgroup namespace a privileged container gets.
    assert cfg.cgroup_parent == "self"
