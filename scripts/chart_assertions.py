#!/usr/bin/env python3
"""Assertions on the devsync Helm chart, run by scripts/chart-test.sh.

  chart_assertions.py rendered MANIFEST --values FILE [--values FILE ...]
      Checks one `helm template` output against the values it was rendered from (the chart's
      values.yaml first, then the variant): security context, resources and probes of every
      container, replicas versus HPA/KEDA (and the reconciler's cap at the partition count),
      hooks, NetworkPolicies, credentials only from Secrets, each service's own settings
      (DEVSYNC_<SERVICE>__*) rendered from its values, and the shape of the KEDA and Prometheus
      Operator objects (which kubernetes-validate has no schema for).

  chart_assertions.py chart CHART_DIR --helm HELM
      Checks the chart itself: every object of values.schema.json is closed
      (additionalProperties false, or a typed map), every key of values.yaml has a comment
      right above it, and `helm lint --strict` rejects bad values (unknown keys, wrong types,
      credentials in plain env, inconsistent settings) with a clear message.

Prints one line per failed assertion and a summary; exits 1 if any assertion failed.
Needs PyYAML (installed with kubernetes-validate).
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

SERVICES = ("requestor", "reconciler", "fanout", "audit")
# The stream KEDA measures per service. The requestor has none (its ingress is a core NATS
# queue group) and so no `keda` values.
STREAM_OF = {
    "reconciler": "DEVSYNC_REQ",
    "fanout": "DEVSYNC_FANOUT",
    "audit": "DEVSYNC_AUDIT",
}
# Env vars that carry credentials: they may only come from a Secret.
CREDENTIAL_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|NKEY|SEED|DATABASE__URL|NATS__USER")
# A URL with user:password@ in it, anywhere in the rendered text.
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@\"']+:[^@\s\"']+@")


class Failures:
    """Collects failed assertions so one run reports all of them."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.items: list[str] = []
        self.count = 0

    def check(self, condition: bool, message: str) -> None:
        self.count += 1
        if not condition:
            self.items.append(message)
            print(f"  FAIL [{self.label}] {message}")


def deep_merge(base: Any, override: Any) -> Any:
    """Helm's value merge: maps merge recursively, anything else is replaced (null deletes)."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            if value is None and key in merged and isinstance(merged[key], dict):
                del merged[key]
            else:
                merged[key] = deep_merge(merged.get(key), value)
        return merged
    return copy.deepcopy(override)


def load_values(paths: list[str]) -> dict:
    values: dict = {}
    for path in paths:
        values = deep_merge(values, yaml.safe_load(Path(path).read_text()) or {})
    return values


# ------------------------------------------------------------------------------------------
# rendered: checks of one `helm template` output
# ------------------------------------------------------------------------------------------


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    kind = doc.get("kind")
    name = doc["metadata"]["name"]
    if kind == "Deployment":
        yield f"Deployment/{name}", doc["spec"]["template"]["spec"]
    elif kind == "Job":
        yield f"Job/{name}", doc["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield f"Pod/{name}", doc["spec"]


def containers(pod: dict) -> Iterator[dict]:
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def env_map(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def component_of(doc: dict) -> str | None:
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def check_rendered(manifest: Path, values: dict, f: Failures) -> None:
    text = manifest.read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)

    drain = values["config"]["drainTimeoutSeconds"]
    partitions = values["config"]["partitions"]
    image = values["image"]
    expected_image = (
        f"{image['repository']}@{image['digest']}"
        if image.get("digest")
        else f"{image['repository']}:{image.get('tag') or '0.1.0'}"
    )

    # --- every object -----------------------------------------------------------------------
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        f.check(
            labels.get("app.kubernetes.io/name") == "devsync" and "app.kubernetes.io/instance" in labels,
            f"{what} lacks the app.kubernetes.io/name and instance labels",
        )
    f.check("Secret" not in by_kind, "the chart renders a Secret: credentials must come from existing Secrets")
    f.check(not URL_WITH_PASSWORD.search(text), "a URL with a password appears in the rendered manifests")

    # --- every pod and container ------------------------------------------------------------
    for doc in docs:
        for where, pod in pod_specs(doc):
            f.check(
                pod.get("automountServiceAccountToken") is False, f"{where}: automountServiceAccountToken is not false"
            )
            psc = pod.get("securityContext", {})
            f.check(psc.get("runAsNonRoot") is True, f"{where}: pod securityContext.runAsNonRoot is not true")
            f.check(
                psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
                f"{where}: pod seccomp is not RuntimeDefault",
            )
            f.check(pod.get("enableServiceLinks") is False, f"{where}: enableServiceLinks is not false")
            for c in containers(pod):
                cw = f"{where} container {c['name']}"
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    for key in ("cpu", "memory"):
                        f.check(key in res.get(part, {}), f"{cw}: no resources.{part}.{key}")
                sc = c.get("securityContext", {})
                f.check(sc.get("runAsNonRoot") is True, f"{cw}: runAsNonRoot is not true")
                f.check(sc.get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem is not true")
                f.check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation is not false")
                f.check(sc.get("privileged") is not True, f"{cw}: privileged")
                f.check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cw}: capabilities.drop is not [ALL]")
                f.check(not sc.get("capabilities", {}).get("add"), f"{cw}: adds capabilities")
                f.check(
                    sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{cw}: seccomp is not RuntimeDefault"
                )
                f.check(c.get("image") == expected_image, f"{cw}: image {c.get('image')} is not {expected_image}")
                f.check(
                    str(c.get("command", [""])[0]).startswith("/usr/local/bin/devsync"),
                    f"{cw}: command does not start with a devsync binary",
                )
                f.check(
                    any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])),
                    f"{cw}: no writable /tmp (the root filesystem is read-only)",
                )
                names = [e["name"] for e in c.get("env", [])]
                f.check(
                    len(names) == len(set(names)),
                    f"{cw}: duplicate env vars {sorted({n for n in names if names.count(n) > 1})}",
                )
                volumes = {v["name"] for v in pod.get("volumes", [])}
                f.check(
                    all(m["name"] in volumes for m in c.get("volumeMounts", [])), f"{cw}: mounts a volume the pod lacks"
                )
                env = env_map(c)
                for name, entry in env.items():
                    if CREDENTIAL_ENV.search(name):
                        f.check(
                            "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}),
                            f"{cw}: {name} does not come from a Secret",
                        )
                f.check(
                    env.get("DEVSYNC_INSTANCE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                    == "metadata.name",
                    f"{cw}: DEVSYNC_INSTANCE is not the pod name",
                )
                f.check(
                    env.get("DEVSYNC_DATABASE__URL", {}).get("valueFrom", {}).get("secretKeyRef")
                    == {"name": values["database"]["existingSecret"], "key": values["database"]["urlKey"]},
                    f"{cw}: DEVSYNC_DATABASE__URL is not read from the database Secret",
                )
                check_nats_auth(cw, c, pod, values, f)
                f.check(
                    env.get("DEVSYNC_SHUTDOWN__DRAIN_TIMEOUT", {}).get("value") == f"{drain}s",
                    f"{cw}: DEVSYNC_SHUTDOWN__DRAIN_TIMEOUT is not {drain}s",
                )
                f.check(
                    env.get("DEVSYNC_TOPOLOGY__PARTITIONS", {}).get("value") == str(partitions),
                    f"{cw}: DEVSYNC_TOPOLOGY__PARTITIONS is not {partitions}",
                )
                f.check(
                    env.get("DEVSYNC_LOG__FORMAT", {}).get("value") == values["config"]["log"]["format"],
                    f"{cw}: DEVSYNC_LOG__FORMAT does not follow config.log.format",
                )
                if values["otel"]["endpoint"]:
                    f.check(
                        env.get("OTEL_EXPORTER_OTLP_ENDPOINT", {}).get("value") == values["otel"]["endpoint"],
                        f"{cw}: OTEL_EXPORTER_OTLP_ENDPOINT is not otel.endpoint",
                    )
                else:
                    f.check(
                        "OTEL_EXPORTER_OTLP_ENDPOINT" not in env,
                        f"{cw}: OTLP endpoint set although otel.endpoint is empty",
                    )
                for key, value in (values["config"].get("env") or {}).items():
                    want = str(value).lower() if isinstance(value, bool) else str(value)
                    component = component_of(doc)
                    override = (values.get(component, {}) or {}).get("env", {}) if component in SERVICES else {}
                    if key not in (override or {}):
                        f.check(env.get(key, {}).get("value") == want, f"{cw}: config.env {key} not rendered")

    # --- the four services --------------------------------------------------------------------
    deployments = {component_of(d): d for d in by_kind.get("Deployment", [])}
    f.check(set(deployments) == set(SERVICES), f"Deployments are {sorted(deployments)}, expected one per service")
    hpas = {d["spec"]["scaleTargetRef"]["name"]: d for d in by_kind.get("HorizontalPodAutoscaler", [])}
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in by_kind.get("ScaledObject", [])}
    pdbs = {component_of(d): d for d in by_kind.get("PodDisruptionBudget", [])}
    services = {component_of(d): d for d in by_kind.get("Service", [])}

    for name in SERVICES:
        v = values[name]
        dep = deployments.get(name)
        if dep is None:
            continue
        dname = dep["metadata"]["name"]
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        where = f"Deployment/{dname}"
        f.check(c["command"] == [f"/usr/local/bin/devsync-{name}"], f"{where}: command is {c['command']}")
        f.check(
            c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
            f"{where}: no liveness probe on /healthz",
        )
        f.check(
            c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz",
            f"{where}: no readiness probe on /readyz",
        )
        f.check(
            c.get("startupProbe", {}).get("httpGet", {}).get("path") == "/healthz",
            f"{where}: no startup probe on /healthz",
        )
        f.check(
            {"name": "http", "containerPort": 8080, "protocol": "TCP"} in c.get("ports", []),
            f"{where}: no http port 8080",
        )
        f.check(
            env_map(c).get("DEVSYNC_HTTP__LISTEN", {}).get("value") == "0.0.0.0:8080", f"{where}: DEVSYNC_HTTP__LISTEN"
        )
        sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        f.check(sleep == v["preStopSleepSeconds"], f"{where}: preStop sleep {sleep} is not {v['preStopSleepSeconds']}")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        f.check(
            grace > drain + sleep, f"{where}: terminationGracePeriodSeconds {grace} <= drain {drain} + preStop {sleep}"
        )
        f.check(grace == v["terminationGracePeriodSeconds"], f"{where}: terminationGracePeriodSeconds is not the value")
        f.check(
            dep["spec"]["strategy"].get("rollingUpdate", {}).get("maxUnavailable") == 0,
            f"{where}: rollout may drop capacity",
        )
        f.check(pod.get("topologySpreadConstraints"), f"{where}: no topology spread")
        for key in ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "priorityClassName"):
            if v.get(key):
                f.check(pod.get(key) == v[key], f"{where}: {key} not rendered from values")
        for key, value in (v.get("podLabels") or {}).items():
            f.check(
                dep["spec"]["template"]["metadata"]["labels"].get(key) == value, f"{where}: pod label {key} missing"
            )
        f.check(
            set(dep["spec"]["selector"]["matchLabels"].items())
            <= set(dep["spec"]["template"]["metadata"]["labels"].items()),
            f"{where}: selector does not match the pod labels",
        )

        keda = v.get("keda") or {"enabled": False}
        f.check(name != "requestor" or "keda" not in v, "requestor values have a keda block")
        autoscaled = v["hpa"]["enabled"] or keda["enabled"]
        if autoscaled:
            f.check("replicas" not in dep["spec"], f"{where}: replicas is set although an autoscaler owns it")
        else:
            f.check(
                dep["spec"].get("replicas") == v["replicaCount"],
                f"{where}: replicas {dep['spec'].get('replicas')} is not replicaCount {v['replicaCount']}",
            )
        cap = partitions if name == "reconciler" else None

        hpa = hpas.get(dname)
        f.check(
            (hpa is not None) == v["hpa"]["enabled"],
            f"{where}: HPA present={hpa is not None}, hpa.enabled={v['hpa']['enabled']}",
        )
        if hpa is not None:
            want_max = min(v["hpa"]["maxReplicas"], cap) if cap else v["hpa"]["maxReplicas"]
            f.check(
                hpa["spec"]["maxReplicas"] == want_max,
                f"HPA/{dname}: maxReplicas {hpa['spec']['maxReplicas']} is not {want_max}",
            )
            f.check(hpa["spec"]["minReplicas"] == v["hpa"]["minReplicas"], f"HPA/{dname}: minReplicas")
            names = [m["resource"]["name"] for m in hpa["spec"]["metrics"]]
            want = ["cpu"] + (["memory"] if v["hpa"].get("targetMemoryUtilizationPercentage") is not None else [])
            f.check(names == want, f"HPA/{dname}: metrics {names} are not {want}")

        so = scaled.get(dname)
        f.check(
            (so is not None) == keda["enabled"],
            f"{where}: ScaledObject present={so is not None}, keda.enabled={keda['enabled']}",
        )
        if so is not None:
            check_scaled_object(name, so, keda, values, cap, f)
        check_service_settings(name, where, env_map(c), values, f)

        pdb = pdbs.get(name)
        f.check(
            (pdb is not None) == v["pdb"]["enabled"],
            f"{where}: PDB present={pdb is not None}, pdb.enabled={v['pdb']['enabled']}",
        )
        if pdb is not None:
            if v["pdb"].get("minAvailable") is not None:
                f.check(
                    pdb["spec"].get("minAvailable") == v["pdb"]["minAvailable"] and "maxUnavailable" not in pdb["spec"],
                    f"PDB/{name}: minAvailable not rendered",
                )
            else:
                f.check(
                    pdb["spec"].get("maxUnavailable") == v["pdb"]["maxUnavailable"],
                    f"PDB/{name}: maxUnavailable not rendered",
                )
            f.check(
                pdb["spec"]["selector"] == dep["spec"]["selector"],
                f"PDB/{name}: selects other pods than its Deployment",
            )

        svc = services.get(name)
        f.check(svc is not None, f"no Service for {name}")
        if svc is not None:
            f.check(svc["spec"]["type"] == "ClusterIP", f"Service/{name}: not ClusterIP")
            f.check(
                svc["spec"]["ports"][0]["port"] == 8080 and svc["spec"]["ports"][0]["targetPort"] == "http",
                f"Service/{name}: not port 8080 -> http",
            )
            f.check(svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"], f"Service/{name}: selector")

    # --- ServiceAccounts ----------------------------------------------------------------------
    for sa in by_kind.get("ServiceAccount", []):
        f.check(
            sa.get("automountServiceAccountToken") is False, f"ServiceAccount/{sa['metadata']['name']}: token automount"
        )
    f.check(
        bool(by_kind.get("ServiceAccount")) == values["serviceAccount"]["create"],
        "ServiceAccounts do not follow serviceAccount.create",
    )

    # --- hook Job and test Pod ----------------------------------------------------------------
    jobs = by_kind.get("Job", [])
    f.check(len(jobs) == (1 if values["migrate"]["enabled"] else 0), "migrate hook Job missing or duplicated")
    for job in jobs:
        ann = job["metadata"].get("annotations", {})
        f.check(
            ann.get("helm.sh/hook") == "pre-install,pre-upgrade", "migrate Job is not a pre-install,pre-upgrade hook"
        )
        pod = job["spec"]["template"]["spec"]
        f.check(pod.get("restartPolicy") == "Never", "migrate Job restartPolicy is not Never")
        commands = [c["command"] for c in containers(pod)]
        f.check(
            commands == [["/usr/local/bin/devsyncctl", "migrate"], ["/usr/local/bin/devsyncctl", "bootstrap"]],
            f"migrate Job runs {commands}, expected devsyncctl migrate then bootstrap",
        )
        # Everything a hook needs must itself be a hook of lower weight (it runs before the rest).
        for vol in pod.get("volumes", []):
            if "configMap" in vol:
                cm = [d for d in by_kind.get("ConfigMap", []) if d["metadata"]["name"] == vol["configMap"]["name"]]
                f.check(
                    cm and cm[0]["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-install,pre-upgrade",
                    "the migrate Job mounts a ConfigMap that is not a hook",
                )
        if values["serviceAccount"]["create"]:
            sa = [d for d in by_kind.get("ServiceAccount", []) if d["metadata"]["name"] == pod["serviceAccountName"]]
            f.check(
                sa and sa[0]["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-install,pre-upgrade",
                "the migrate Job uses a ServiceAccount that is not a hook",
            )
    tests = [p for p in by_kind.get("Pod", []) if p["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    f.check(len(tests) == (1 if values["tests"]["enabled"] else 0), "helm test Pod missing or duplicated")
    for pod in tests:
        (c,) = pod["spec"]["containers"]
        f.check(
            c["command"]
            == ["/usr/local/bin/devsyncctl", "smoke", "--timeout", f"{values['tests']['timeoutSeconds']}s"],
            f"test Pod runs {c['command']}",
        )
        f.check(pod["spec"].get("restartPolicy") == "Never", "test Pod restartPolicy is not Never")

    check_network_policies(by_kind.get("NetworkPolicy", []), values, f)
    check_service_monitor(by_kind.get("ServiceMonitor", []), values, f)


def service_settings(name: str, values: dict) -> dict[str, str]:
    """The DEVSYNC_<SERVICE>__* variables the chart renders from a service's values."""
    window = values["config"]["activeWindow"]
    if name == "requestor":
        s = values["requestor"]["scheduler"]
        return {
            "DEVSYNC_REQUESTOR__SCHEDULER__SWEEP_EVERY": s["sweepEvery"],
            "DEVSYNC_REQUESTOR__SCHEDULER__DRIFT_AFTER": s["driftAfter"],
            "DEVSYNC_REQUESTOR__SCHEDULER__INACTIVE_AFTER": s["inactiveAfter"],
            "DEVSYNC_REQUESTOR__SCHEDULER__CAMPAIGN_EXPIRY": s["campaignExpiry"],
            "DEVSYNC_REQUESTOR__SCHEDULER__ACTIVE_WINDOW": window,
        }
    if name == "reconciler":
        return {"DEVSYNC_RECONCILER__ACTIVE_WINDOW": window}
    if name == "fanout":
        w = values["fanout"]["webhooks"]
        return {
            "DEVSYNC_FANOUT__DEFAULT_POLICY": values["fanout"]["defaultPushPolicy"],
            "DEVSYNC_FANOUT__ACTIVE_WINDOW": window,
            "DEVSYNC_FANOUT__WEBHOOK_TIMEOUT": w["timeout"],
            "DEVSYNC_FANOUT__WEBHOOK_ATTEMPTS": str(w["attempts"]),
            "DEVSYNC_FANOUT__WEBHOOK_WORKERS": str(w["workers"]),
            "DEVSYNC_FANOUT__BREAKER_FAILURES": str(w["breakerFailures"]),
            "DEVSYNC_FANOUT__BREAKER_OPEN": w["breakerOpen"],
        }
    return {}


def check_service_settings(name: str, where: str, env: dict[str, dict], values: dict, f: Failures) -> None:
    """A service gets its own settings from its values (unless an env map overrides them), and no
    other service's."""
    overrides = {**(values["config"].get("env") or {}), **(values[name].get("env") or {})}
    for var, want in service_settings(name, values).items():
        if var in overrides:
            continue
        got = env.get(var, {}).get("value")
        f.check(got == want, f"{where}: {var} is {got!r}, expected {want!r} from the values")
    for other in SERVICES:
        prefix = f"DEVSYNC_{other.upper()}__"
        if other != name:
            stray = [var for var in env if var.startswith(prefix) and var not in overrides]
            f.check(not stray, f"{where}: settings of {other}: {stray}")


def check_nats_auth(cw: str, c: dict, pod: dict, values: dict, f: Failures) -> None:
    env = env_map(c)
    auth = values["nats"]["auth"]
    identity = c["name"] if c["name"] in SERVICES else "admin"
    if auth["type"] == "userPassword":
        for var, key in (
            ("DEVSYNC_NATS__USER", f"{identity}-user"),
            ("DEVSYNC_NATS__PASSWORD", f"{identity}-password"),
        ):
            f.check(
                env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
                == {"name": auth["existingSecret"], "key": key},
                f"{cw}: {var} is not key {key} of Secret {auth['existingSecret']}",
            )
        f.check("DEVSYNC_NATS__CREDS_FILE" not in env, f"{cw}: creds file set with userPassword")
    elif auth["type"] == "credsFile":
        path = f"/etc/devsync/nats/{identity}.creds"
        f.check(
            env.get("DEVSYNC_NATS__CREDS_FILE", {}).get("value") == path,
            f"{cw}: DEVSYNC_NATS__CREDS_FILE is not {path}",
        )
        f.check("DEVSYNC_NATS__PASSWORD" not in env, f"{cw}: password set with credsFile")
        mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
        f.check(
            mounts.get("nats-creds", {}).get("mountPath") == "/etc/devsync/nats"
            and mounts["nats-creds"].get("readOnly"),
            f"{cw}: creds not mounted read-only at /etc/devsync/nats",
        )
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        secret = vols.get("nats-creds", {}).get("secret", {})
        f.check(
            secret.get("secretName") == auth["existingSecret"],
            f"{cw}: creds volume is not Secret {auth['existingSecret']}",
        )
        f.check(
            secret.get("items") == [{"key": f"{identity}.creds", "path": f"{identity}.creds"}],
            f"{cw}: creds volume does not project only {identity}.creds",
        )
        f.check(secret.get("defaultMode") == 0o440, f"{cw}: creds file mode is not 0440")
    else:
        f.check(
            not any(k.startswith("DEVSYNC_NATS__") and k != "DEVSYNC_NATS__URL" for k in env),
            f"{cw}: NATS credentials set although nats.auth.type is none",
        )


# The fields KEDA documents for a ScaledObject and its triggers (keda.sh/v1alpha1).
SCALED_OBJECT_SPEC = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
TRIGGER_KEYS = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
TRIGGER_METADATA = {
    "nats-jetstream": {
        "natsServerMonitoringEndpoint",
        "account",
        "stream",
        "consumer",
        "lagThreshold",
        "activationLagThreshold",
        "useHttps",
    },
    "metrics-api": {
        "url",
        "format",
        "valueLocation",
        "targetValue",
        "activationTargetValue",
        "method",
        "authMode",
        "unsafeSsl",
    },
}
SCALING_MODIFIERS = {"formula", "target", "activationTarget", "metricType"}


def check_scaled_object(name: str, so: dict, keda: dict, values: dict, cap: int | None, f: Failures) -> None:
    what = f"ScaledObject/{so['metadata']['name']}"
    spec = so["spec"]
    f.check(so["apiVersion"] == "keda.sh/v1alpha1", f"{what}: apiVersion")
    f.check(set(spec) <= SCALED_OBJECT_SPEC, f"{what}: unknown spec fields {sorted(set(spec) - SCALED_OBJECT_SPEC)}")
    f.check(
        spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": so["metadata"]["name"]},
        f"{what}: scaleTargetRef",
    )
    want_max = min(keda["maxReplicaCount"], cap) if cap else keda["maxReplicaCount"]
    f.check(spec["maxReplicaCount"] == want_max, f"{what}: maxReplicaCount {spec['maxReplicaCount']} is not {want_max}")
    f.check(spec["minReplicaCount"] == keda["minReplicaCount"], f"{what}: minReplicaCount")
    f.check(spec["minReplicaCount"] >= 1, f"{what}: scales to zero")
    triggers = spec["triggers"]
    for t in triggers:
        f.check(set(t) <= TRIGGER_KEYS, f"{what}: unknown trigger fields {sorted(set(t) - TRIGGER_KEYS)}")
        allowed = TRIGGER_METADATA.get(t["type"], set())
        f.check(
            set(t["metadata"]) <= allowed,
            f"{what}: unknown {t['type']} metadata {sorted(set(t['metadata']) - allowed)}",
        )
        f.check(
            all(isinstance(x, str) for x in t["metadata"].values()), f"{what}: trigger metadata values must be strings"
        )
    g = values["keda"]
    stream = STREAM_OF[name]
    if keda["trigger"] == "metrics-api":
        f.check(
            len(triggers) == 1 and triggers[0]["type"] == "metrics-api", f"{what}: expected one metrics-api trigger"
        )
        md = triggers[0]["metadata"]
        scheme = "https" if g["useHttps"] else "http"
        f.check(md["url"].startswith(f"{scheme}://{g['natsMonitoringEndpoint']}/jsz?acc="), f"{what}: url {md['url']}")
        f.check(
            md["valueLocation"] == f'account_details.0.stream_detail.#(name=="{stream}").state.messages',
            f"{what}: valueLocation {md['valueLocation']}",
        )
        f.check(md["targetValue"] == str(keda["lagThreshold"]), f"{what}: targetValue")
    elif name == "reconciler":
        partitions = values["config"]["partitions"]
        consumers = sorted(t["metadata"]["consumer"] for t in triggers)
        want = sorted(f"reconcile-{lane}-{k}" for lane in ("rt", "bulk") for k in range(partitions))
        f.check(consumers == want, f"{what}: triggers cover {len(consumers)} consumers, expected {len(want)}")
        f.check(
            all(t["type"] == "nats-jetstream" and t["metadata"]["stream"] == "DEVSYNC_REQ" for t in triggers),
            f"{what}: every trigger must be nats-jetstream on DEVSYNC_REQ",
        )
        mods = spec.get("advanced", {}).get("scalingModifiers", {})
        f.check(set(mods) <= SCALING_MODIFIERS, f"{what}: unknown scalingModifiers fields")
        f.check(
            sorted(mods.get("formula", "").split(" + ")) == sorted(t["name"] for t in triggers),
            f"{what}: the formula does not sum every trigger",
        )
        f.check(mods.get("target") == str(keda["lagThreshold"]), f"{what}: formula target")
    else:
        f.check(
            len(triggers) == 1 and triggers[0]["type"] == "nats-jetstream",
            f"{what}: expected one nats-jetstream trigger",
        )
        md = triggers[0]["metadata"]
        f.check(
            md["stream"] == stream and md["consumer"] == name, f"{what}: trigger on {md['stream']}/{md['consumer']}"
        )
        f.check(
            md["natsServerMonitoringEndpoint"] == g["natsMonitoringEndpoint"] and md["account"] == g["account"],
            f"{what}: endpoint/account not from keda.*",
        )
        f.check(md["lagThreshold"] == str(keda["lagThreshold"]), f"{what}: lagThreshold")


def check_network_policies(policies: list[dict], values: dict, f: Failures) -> None:
    np = values["networkPolicy"]
    if not np["enabled"]:
        f.check(not policies, "NetworkPolicies rendered although networkPolicy.enabled is false")
        return
    names = {p["metadata"]["name"]: p for p in policies}
    base = [p for p in policies if "app.kubernetes.io/component" not in p["spec"]["podSelector"]["matchLabels"]]
    f.check(len(base) == 1, "no single baseline NetworkPolicy selecting every devsync pod")
    for p in policies:
        what = f"NetworkPolicy/{p['metadata']['name']}"
        for rule in p["spec"].get("ingress", []):
            f.check(rule.get("from"), f"{what}: an ingress rule without `from` admits everyone")
            f.check(
                all(port["port"] == 8080 for port in rule.get("ports", [])) and rule.get("ports"),
                f"{what}: ingress to another port than 8080",
            )
        for rule in p["spec"].get("egress", []):
            f.check(rule.get("to"), f"{what}: an egress rule without `to` allows everything")
            f.check(rule.get("ports"), f"{what}: an egress rule without ports")
        for rule in p["spec"].get("egress", []) + p["spec"].get("ingress", []):
            for peer in rule.get("to", []) + rule.get("from", []):
                if "ipBlock" in peer:
                    check_ip_block(what, peer["ipBlock"], f)
    if base:
        spec = base[0]["spec"]
        f.check(
            spec["policyTypes"] == ["Ingress", "Egress"], "baseline NetworkPolicy does not restrict both directions"
        )
        egress_ports = sorted({port["port"] for rule in spec.get("egress", []) for port in rule["ports"]})
        want = {53, *np["nats"]["ports"], *np["postgres"]["ports"]}
        if values["otel"]["endpoint"]:
            want |= set(np["otlp"]["ports"])
        f.check(egress_ports == sorted(want), f"baseline egress ports {egress_ports} are not {sorted(want)}")
    webhooks = [p for n, p in names.items() if n.endswith("-fanout-webhooks")]
    f.check(
        len(webhooks) == (1 if np["fanoutWebhooks"]["enabled"] else 0),
        "fan-out webhook egress does not follow its switch",
    )
    for p in webhooks:
        blocks = [peer["ipBlock"] for rule in p["spec"]["egress"] for peer in rule["to"]]
        f.check(blocks == np["fanoutWebhooks"]["ipBlocks"], f"webhook ipBlocks {blocks}")
        f.check(
            p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "fanout",
            "webhook egress applies to other pods than the fan-out",
        )
    audit_api = [p for n, p in names.items() if n.endswith("-audit-api")]
    f.check(len(audit_api) == 1, "no NetworkPolicy opening the audit search API")


def check_ip_block(what: str, block: dict, f: Failures) -> None:
    """What the API server checks and kubernetes-validate does not: valid CIDRs, exceptions inside."""
    try:
        net = ipaddress.ip_network(block["cidr"], strict=True)
        excepts = [ipaddress.ip_network(e, strict=True) for e in block.get("except", [])]
    except ValueError as exc:
        f.check(False, f"{what}: invalid ipBlock {block}: {exc}")
        return
    for e in excepts:
        f.check(
            e.version == net.version and e.subnet_of(net) and e != net,
            f"{what}: except {e} is not strictly inside {net}",
        )


SERVICE_MONITOR_SPEC = {
    "selector",
    "namespaceSelector",
    "endpoints",
    "jobLabel",
    "targetLabels",
    "podTargetLabels",
    "sampleLimit",
    "targetLimit",
    "attachMetadata",
}
ENDPOINT_KEYS = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "relabelings",
    "metricRelabelings",
    "tlsConfig",
    "bearerTokenSecret",
    "params",
}


def check_service_monitor(monitors: list[dict], values: dict, f: Failures) -> None:
    sm = values["serviceMonitor"]
    f.check(len(monitors) == (1 if sm["enabled"] else 0), "ServiceMonitor does not follow serviceMonitor.enabled")
    for m in monitors:
        f.check(m["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
        f.check(
            set(m["spec"]) <= SERVICE_MONITOR_SPEC,
            f"ServiceMonitor: unknown spec fields {sorted(set(m['spec']) - SERVICE_MONITOR_SPEC)}",
        )
        for key, value in (sm.get("labels") or {}).items():
            f.check(m["metadata"]["labels"].get(key) == value, f"ServiceMonitor: label {key} missing")
        (ep,) = m["spec"]["endpoints"]
        f.check(set(ep) <= ENDPOINT_KEYS, "ServiceMonitor: unknown endpoint fields")
        f.check(ep["port"] == "http" and ep["path"] == "/metrics", "ServiceMonitor: not scraping http /metrics")
        f.check(ep.get("interval") == sm["interval"], "ServiceMonitor: interval")


# ------------------------------------------------------------------------------------------
# chart: checks of the schema, the documentation of values.yaml, and bad values
# ------------------------------------------------------------------------------------------


def walk_schema(node: Any, path: str) -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield path, node
        for key, value in node.items():
            yield from walk_schema(value, f"{path}/{key}")
    elif isinstance(node, list):
        for n, value in enumerate(node):
            yield from walk_schema(value, f"{path}/{n}")


def undocumented_keys(values_text: str) -> list[str]:
    """Keys of values.yaml without a comment line right above them (list items are data)."""
    missing = []
    previous = ""
    list_indent: int | None = None
    key_re = re.compile(r"^(\s*)([A-Za-z0-9_.-]+):(\s|$)")
    for number, line in enumerate(values_text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if list_indent is not None and indent > list_indent:
            previous = line
            continue
        list_indent = None
        if stripped.startswith("- "):
            list_indent = indent
            previous = line
            continue
        m = key_re.match(line)
        if m and not previous.strip().startswith("#"):
            missing.append(f"line {number}: {m.group(2)}")
        previous = line
    return missing


# Bad values and what the refusal must say: (case, values, stage, expected text). "lint" cases
# break the schema (helm lint --strict and every install refuse them); "template" cases break a
# rule between values, enforced by `fail` in templates/validate.yaml (helm lint only logs those,
# so they are checked with helm template, as install and upgrade render).
BAD_VALUES = [
    ("unknown top-level key", {"replicas": 3}, "lint", "additional properties 'replicas' not allowed"),
    (
        "unknown nested key",
        {"reconciler": {"keda": {"maxReplicas": 3}}},
        "lint",
        "additional properties 'maxReplicas' not allowed",
    ),
    (
        "unknown key in resources",
        {"audit": {"resources": {"requests": {"gpu": 1}}}},
        "lint",
        "additional properties 'gpu' not allowed",
    ),
    ("wrong type: replicaCount as string", {"requestor": {"replicaCount": "2"}}, "lint", "replicaCount"),
    ("wrong type: networkPolicy.enabled as string", {"networkPolicy": {"enabled": "yes"}}, "lint", "enabled"),
    ("wrong type: partitions as float", {"config": {"partitions": 6.5}}, "lint", "partitions"),
    ("bad enum: nats.auth.type", {"nats": {"auth": {"type": "token"}}}, "lint", "type"),
    (
        "credential in plain env",
        {"config": {"env": {"DEVSYNC_DATABASE__URL": "postgres://u:p@db/devsync"}}},
        "lint",
        "DEVSYNC_DATABASE__URL",
    ),
    (
        "credential in a service's env",
        {"fanout": {"env": {"DEVSYNC_NATS__PASSWORD": "x"}}},
        "lint",
        "DEVSYNC_NATS__PASSWORD",
    ),
    (
        "grace period shorter than the drain",
        {"audit": {"terminationGracePeriodSeconds": 20}},
        "template",
        "audit.terminationGracePeriodSeconds (20) must be greater than",
    ),
    (
        "hpa and keda together",
        {"fanout": {"hpa": {"enabled": True}, "keda": {"enabled": True}}},
        "template",
        "exclusive",
    ),
    (
        "more reconcilers than partitions",
        {"config": {"partitions": 4}, "reconciler": {"replicaCount": 5}},
        "template",
        "must not exceed config.partitions",
    ),
    (
        "webhooks on without ranges",
        {"networkPolicy": {"fanoutWebhooks": {"enabled": True}}},
        "template",
        "ipBlocks must list at least one range",
    ),
    (
        "KEDA for the requestor (no JetStream backlog)",
        {"requestor": {"keda": {"enabled": True}}},
        "lint",
        "additional properties 'keda' not allowed",
    ),
    ("unknown push policy", {"fanout": {"defaultPushPolicy": "push-all"}}, "lint", "defaultPushPolicy"),
    ("duration without a unit", {"requestor": {"scheduler": {"sweepEvery": "60"}}}, "lint", "sweepEvery"),
    ("zero duration", {"fanout": {"webhooks": {"timeout": "0s"}}}, "lint", "timeout"),
    ("no webhook attempts", {"fanout": {"webhooks": {"attempts": 0}}}, "lint", "attempts"),
    (
        "more webhook attempts than deliveries",
        {"fanout": {"webhooks": {"attempts": 11}}},
        "template",
        "fanout.webhooks.attempts (11) must not exceed",
    ),
    ("active window as a number", {"config": {"activeWindow": 900}}, "lint", "activeWindow"),
    (
        "webhook range without a cidr",
        {"networkPolicy": {"fanoutWebhooks": {"ipBlocks": [{"except": ["10.0.0.0/8"]}]}}},
        "lint",
        "cidr",
    ),
]


def check_chart(chart: Path, helm: str, f: Failures) -> None:
    schema = json.loads((chart / "values.schema.json").read_text())
    f.check(
        schema.get("$schema", "").startswith("http://json-schema.org/draft-07/"), "values.schema.json is not draft-07"
    )
    for path, node in walk_schema(schema, "#"):
        ap = node.get("additionalProperties", None)
        f.check(
            ap is False or isinstance(ap, dict),
            f"schema object {path} is open (additionalProperties must be false or typed)",
        )
    missing = undocumented_keys((chart / "values.yaml").read_text())
    f.check(not missing, f"values.yaml keys without a comment above: {missing}")

    with tempfile.TemporaryDirectory(prefix="devsync-bad-values-") as tmp:
        for label, bad, stage, expected in BAD_VALUES:
            path = Path(tmp) / "bad.yaml"
            path.write_text(yaml.safe_dump(bad))
            if stage == "lint":
                cmd = [helm, "lint", "--strict", str(chart), "-f", str(path)]
            else:
                cmd = [helm, "template", "bad", str(chart), "-f", str(path)]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            output = run.stdout + run.stderr
            f.check(run.returncode != 0, f"helm {stage} accepted bad values ({label})")
            f.check(
                expected.lower() in output.lower(),
                f"helm {stage} refused bad values ({label}) without saying "
                f"{expected!r}: {output.strip().splitlines()[-3:]}",
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rendered = sub.add_parser("rendered", help="check one helm template output")
    rendered.add_argument("manifest", type=Path)
    rendered.add_argument("--values", action="append", required=True, help="values files in helm's order")
    rendered.add_argument("--label", default=None)
    chart = sub.add_parser("chart", help="check the schema, values documentation and bad values")
    chart.add_argument("chart", type=Path)
    chart.add_argument("--helm", required=True)
    args = parser.parse_args()

    if args.command == "rendered":
        f = Failures(args.label or args.manifest.name)
        check_rendered(args.manifest, load_values(args.values), f)
    else:
        f = Failures("chart")
        check_chart(args.chart, args.helm, f)
    print(f"chart_assertions [{f.label}]: {f.count - len(f.items)} passed, {len(f.items)} failed")
    return 1 if f.items else 0


if __name__ == "__main__":
    sys.exit(main())
