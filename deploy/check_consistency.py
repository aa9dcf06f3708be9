"""What a schema cannot see: that docker/ and deploy/ agree with each other and with the server.

Run by deploy/validate.sh (with the venv's PyYAML) as

    python deploy/check_consistency.py RENDERED.yaml...

where each RENDERED.yaml is one overlay rendered by kustomize. It reads the server's sources for
the names it checks against: the environment variables of `logit-lens serve`
(src/server/config.rs), its routes (src/server/mod.rs) and the queue-depth metric
(src/server/metrics.rs). Prints one line per problem and exits 1 if there is any.
"""

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# Created by the operator (deploy/README.md), never rendered: the API keys, and the optional
# Hugging Face token of the download Job.
EXTERNAL_SECRETS = {"logit-lens-api-keys": {"api-keys", "metrics-key"}, "hf-token": {"token"}}
QUEUE_METRIC = "logit_lens_queue_depth"

problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def server_env_vars():
    text = (ROOT / "src/server/config.rs").read_text()
    names = set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', text))
    if not names:
        sys.exit("found no `env = \"...\"` in src/server/config.rs: update deploy/check_consistency.py")
    # The Hugging Face cache location, read by src/server/resolve.rs.
    resolve = (ROOT / "src/server/resolve.rs").read_text()
    names |= {v for v in ("HF_HOME", "HF_HUB_CACHE") if f'"{v}"' in resolve}
    return names


def server_routes():
    text = (ROOT / "src/server/mod.rs").read_text()
    return set(re.findall(r'\.route\(\s*"([^"]+)"', text))


def server_metrics():
    text = (ROOT / "src/server/metrics.rs").read_text()
    return set(re.findall(r"# TYPE (\w+) ", text))


ENV = server_env_vars()
ROUTES = server_routes()
METRICS = server_metrics()


def check_env_name(where, name):
    if (name.startswith("LOGIT_LENS_") or name.startswith("HF_")) and name not in ENV | {"HF_TOKEN"}:
        problem(where, f"environment variable {name} is not one that `logit-lens serve` reads")


def check_route(where, path):
    if path not in ROUTES:
        problem(where, f"{path} is not a route of the server (src/server/mod.rs has {sorted(ROUTES)})")


def selector_matches(selector, labels):
    match = selector.get("matchLabels", selector) if isinstance(selector, dict) else {}
    if "matchExpressions" in selector:
        return False  # not used here; flagged so that a change is looked at
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def check_overlay(path):
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    where = Path(path).stem
    deployments = by_kind.get("Deployment", [])
    if len(deployments) != 1:
        problem(where, f"expected one Deployment, found {len(deployments)}")
        return
    dep = deployments[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    if not selector_matches(spec["selector"], labels):
        problem(where, "the Deployment's selector does not match its pod labels")
    if "replicas" in spec and by_kind.get("HorizontalPodAutoscaler"):
        problem(where, "Deployment sets replicas while an HPA scales it: every apply would reset the count")
    if pod.get("enableServiceLinks") is not False:
        problem(where, "enableServiceLinks must be false: the Service `logit-lens` would set LOGIT_LENS_PORT=tcp://...")

    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind.get("ConfigMap", [])}
    pvcs = {p["metadata"]["name"] for p in by_kind.get("PersistentVolumeClaim", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for v in volumes.values():
        if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
            problem(where, f"volume {v['name']} claims {v['persistentVolumeClaim']['claimName']}, which is not rendered")
        if "configMap" in v and v["configMap"]["name"] not in configmaps:
            problem(where, f"volume {v['name']} names ConfigMap {v['configMap']['name']}, which is not rendered")
        if "secret" in v:
            name = v["secret"]["secretName"]
            keys = {i["key"] for i in v["secret"].get("items", [])}
            if name not in EXTERNAL_SECRETS or not keys <= EXTERNAL_SECRETS[name]:
                problem(where, f"volume {v['name']} names Secret {name} {sorted(keys)}, not one deploy/README.md creates")

    containers = pod["containers"]
    if len(containers) != 1:
        problem(where, f"expected one container, found {len(containers)}")
    c = containers[0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    env = {}
    for src in c.get("envFrom", []):
        name = src.get("configMapRef", {}).get("name")
        if name not in configmaps:
            problem(where, f"envFrom names ConfigMap {name}, which is not rendered")
        env.update(configmaps.get(name, {}))
    for e in c.get("env", []):
        env[e["name"]] = e.get("value")
    for name in env:
        check_env_name(where, name)
    if env.get("LOGIT_LENS_HOST") != "0.0.0.0":
        problem(where, "LOGIT_LENS_HOST must be 0.0.0.0 in a pod (the default, 127.0.0.1, is unreachable)")
    port = int(env.get("LOGIT_LENS_PORT", "8000"))
    if ports.get("http") != port:
        problem(where, f"container port `http` is {ports.get('http')}, the server listens on {port}")

    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        p = c.get(probe)
        if not p or "httpGet" not in p:
            problem(where, f"{probe} missing (an HTTP GET on {path})")
            continue
        check_route(where, p["httpGet"]["path"])
        if p["httpGet"]["path"] != path:
            problem(where, f"{probe} probes {p['httpGet']['path']}, expected {path}")
        if p["httpGet"]["port"] not in ports and p["httpGet"]["port"] not in ports.values():
            problem(where, f"{probe} probes port {p['httpGet']['port']}, which the container does not declare")
    startup = c.get("startupProbe", {})
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 300:
        problem(where, "startupProbe allows less than 5 minutes: loading a real model takes minutes")

    # The API key file lies in a mounted Secret.
    keys_file = env.get("LOGIT_LENS_API_KEYS_FILE")
    if not keys_file:
        problem(where, "LOGIT_LENS_API_KEYS_FILE is not set: the service would run without API keys")
    else:
        found = False
        for m in c.get("volumeMounts", []):
            v = volumes.get(m["name"], {})
            if "secret" in v and keys_file.startswith(m["mountPath"].rstrip("/") + "/"):
                rel = keys_file[len(m["mountPath"].rstrip("/")) + 1:]
                items = v["secret"].get("items")
                found = items is None or rel in {i["path"] for i in items}
        if not found:
            problem(where, f"LOGIT_LENS_API_KEYS_FILE={keys_file} is not a file of a mounted Secret")
    for m in c.get("volumeMounts", []):
        if m["name"] not in volumes:
            problem(where, f"volumeMount {m['name']} has no volume")

    timeout_s = int(env.get("LOGIT_LENS_QUEUE_TIMEOUT_MS", "60000")) / 1000
    if pod.get("terminationGracePeriodSeconds", 30) <= timeout_s:
        problem(where, "terminationGracePeriodSeconds must exceed the queue timeout: SIGTERM answers the queue first")

    res = c.get("resources", {})
    for r in ("cpu", "memory"):
        if r not in res.get("requests", {}):
            problem(where, f"no {r} request")
    device = env.get("LOGIT_LENS_DEVICE", "auto")
    gpus = res.get("limits", {}).get("nvidia.com/gpu")
    if device.startswith("cuda") and str(gpus) != "1":
        problem(where, f"LOGIT_LENS_DEVICE={device} but the container's nvidia.com/gpu limit is {gpus!r} (want 1)")
    if device == "cpu" and gpus:
        problem(where, "LOGIT_LENS_DEVICE=cpu but the pod takes a GPU")
    if env.get("HF_HOME") and not any(
        env["HF_HOME"].startswith(m["mountPath"].rstrip("/") + "/") or env["HF_HOME"] == m["mountPath"]
        for m in c.get("volumeMounts", [])
    ):
        problem(where, f"HF_HOME={env['HF_HOME']} is not on a mounted volume")

    name = dep["metadata"]["name"]
    for s in by_kind.get("Service", []):
        if not selector_matches(s["spec"]["selector"], labels):
            problem(where, f"Service {s['metadata']['name']} does not select the pods")
        for p in s["spec"]["ports"]:
            if p["targetPort"] not in ports and p["targetPort"] not in ports.values():
                problem(where, f"Service port {p.get('name')} targets {p['targetPort']}, not a container port")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not selector_matches(pdb["spec"]["selector"], labels):
            problem(where, "the PodDisruptionBudget does not select the pods")
    for np in by_kind.get("NetworkPolicy", []):
        if not selector_matches(np["spec"]["podSelector"], labels):
            problem(where, "the NetworkPolicy does not select the pods")
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                if p["port"] not in ports and p["port"] not in ports.values():
                    problem(where, f"the NetworkPolicy admits port {p['port']}, not a container port")
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    if not hpas:
        problem(where, "no HorizontalPodAutoscaler")
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) != ("Deployment", name):
            problem(where, f"the HPA scales {ref['kind']}/{ref['name']}, not Deployment/{name}")
        if hpa["spec"]["minReplicas"] > hpa["spec"]["maxReplicas"]:
            problem(where, "HPA minReplicas > maxReplicas")
        for m in hpa["spec"].get("metrics", []):
            if m["type"] == "Pods" and m["pods"]["metric"]["name"] not in METRICS:
                problem(where, f"the HPA scales on {m['pods']['metric']['name']}, which /metrics does not export")
    return labels, ports, volumes


def check_extras(labels, ports):
    job = yaml.safe_load((ROOT / "deploy/jobs/download-model.yaml").read_text())
    base_pvc = yaml.safe_load((ROOT / "deploy/base/pvc.yaml").read_text())["metadata"]["name"]
    jpod = job["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in jpod["volumes"] if "persistentVolumeClaim" in v]
    if claims != [base_pvc]:
        problem("jobs/download-model.yaml", f"claims {claims}, the model cache is {base_pvc}")
    for e in jpod["containers"][0].get("env", []):
        check_env_name("jobs/download-model.yaml", e["name"])
        if "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            if ref["key"] not in EXTERNAL_SECRETS.get(ref["name"], set()):
                problem("jobs/download-model.yaml", f"Secret {ref['name']}/{ref['key']} is not one deploy/README.md creates")

    monitor = yaml.safe_load((ROOT / "deploy/monitoring/podmonitor.yaml").read_text())
    if monitor["kind"] != "PodMonitor" or not monitor["apiVersion"].startswith("monitoring.coreos.com/"):
        problem("monitoring/podmonitor.yaml", "expected a monitoring.coreos.com PodMonitor")
    if not selector_matches(monitor["spec"]["selector"], labels):
        problem("monitoring/podmonitor.yaml", "does not select the pods")
    for ep in monitor["spec"]["podMetricsEndpoints"]:
        check_route("monitoring/podmonitor.yaml", ep["path"])
        if ep["port"] not in ports:
            problem("monitoring/podmonitor.yaml", f"port {ep['port']} is not a container port")
        cred = ep.get("authorization", {}).get("credentials", {})
        if cred.get("key") not in EXTERNAL_SECRETS.get(cred.get("name"), set()):
            problem("monitoring/podmonitor.yaml", "/metrics needs a key: authorization must name logit-lens-api-keys/metrics-key")

    adapter = yaml.safe_load((ROOT / "deploy/monitoring/prometheus-adapter-values.yaml").read_text())
    names = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    if QUEUE_METRIC not in names or not all(QUEUE_METRIC in r["seriesQuery"] for r in adapter["rules"]["custom"]):
        problem("monitoring/prometheus-adapter-values.yaml", f"no rule serving {QUEUE_METRIC}")


def check_docker():
    compose = yaml.safe_load((ROOT / "docker/compose.yaml").read_text())
    for name, svc in compose["services"].items():
        for var in svc.get("environment", {}):
            check_env_name(f"compose.yaml {name}", var)
    svc = compose["services"]["logit-lens"]
    env = svc["environment"]
    if env.get("LOGIT_LENS_HOST") != "0.0.0.0":
        problem("compose.yaml", "LOGIT_LENS_HOST must be 0.0.0.0")
    if env.get("LOGIT_LENS_API_KEYS_FILE") != "/run/secrets/" + svc["secrets"][0]:
        problem("compose.yaml", "LOGIT_LENS_API_KEYS_FILE must be the mounted secret")
    for part in svc["healthcheck"]["test"]:
        m = re.match(r"http://127\.0\.0\.1:\d+(/\S*)", part)
        if m:
            check_route("compose.yaml healthcheck", m.group(1))
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    if not any("gpu" in d.get("capabilities", []) for d in devices):
        problem("compose.yaml", "no GPU reservation")

    for dockerfile in ("docker/Dockerfile", "docker/Dockerfile.cuda"):
        text = (ROOT / dockerfile).read_text()
        for name in re.findall(r"\b(LOGIT_LENS_[A-Z_]+|HF_[A-Z_]+)=", text):
            check_env_name(dockerfile, name)
        m = re.search(r"HEALTHCHECK[^\n]*\\?\n?[^\n]*127\.0\.0\.1:\$\{LOGIT_LENS_PORT\}(/\w+)", text)
        if not m:
            problem(dockerfile, "no HEALTHCHECK on http://127.0.0.1:${LOGIT_LENS_PORT}/...")
        else:
            check_route(dockerfile, m.group(1))
            if m.group(1) != "/health":
                problem(dockerfile, f"HEALTHCHECK probes {m.group(1)}, expected /health")
        if not re.search(r"^USER (?!0\b|root\b)", text, re.M):
            problem(dockerfile, "no non-root USER")
        if "cargo build --release" not in text:
            problem(dockerfile, "the build step is not `cargo build --release` (the command CI runs)")
        if "LOGIT_LENS_HOST=0.0.0.0" not in text:
            problem(dockerfile, "LOGIT_LENS_HOST=0.0.0.0 not set")


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: check_consistency.py RENDERED.yaml...")
    if QUEUE_METRIC not in METRICS:
        problem("src/server/metrics.rs", f"{QUEUE_METRIC} is no longer exported: the HPA and the adapter rule scale on it")
    for route in ("/health", "/ready", "/metrics"):
        check_route("src/server/mod.rs", route)
    shapes = [check_overlay(p) for p in sys.argv[1:]]
    labels, ports, _ = next(s for s in shapes if s)
    check_extras(labels, ports)
    check_docker()
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        sys.exit(1)
    print(f"consistency: {len(sys.argv) - 1} overlay(s), the download Job, the monitoring files, compose.yaml and "
          f"both Dockerfiles agree with src/server (env vars, routes, {QUEUE_METRIC})")


if __name__ == "__main__":
    main()
