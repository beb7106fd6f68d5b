#!/usr/bin/env python3
"""Checks the deployment files against the code they describe.

Parses every YAML and JSON file under k8s/ and grafana/, then asserts:
- the sigrouter Deployment: probes (/readyz readiness, /healthz liveness, on the metrics
  port), termination grace above the drain deadline plus the shutdown grace, rolling update
  with maxUnavailable 0 / maxSurge 1, node id from metadata.name, advertise from the pod IP,
  the cluster key mounted from a Secret where SIGROUTER_CLUSTER_KEY_FILE points;
- every SIGROUTER_* variable set (env or the envFrom ConfigMap) is one the binary reads
  (src/config.rs, or src/bin/sigrouter/main.rs for SIGROUTER_LOG);
- the Services: clients on 7400/UDP, a headless cluster Service on 7401/UDP; a PDB exists;
- the nginx example keeps pushes working (UDP listen, proxy_timeout above the heartbeat,
  no proxy_responses);
- the Grafana dashboard uses a ${datasource} Prometheus variable, names only metrics that
  src/metrics.rs defines, and has a panel for every metric src/metrics.rs defines;
- the alert rules name only metrics src/metrics.rs defines;
- with promtool on PATH: every alert and every dashboard query parses as PromQL.

Exit status 0 when all checks pass; prints one line per failure otherwise.
Usage: python3 scripts/check-manifests.py   (from anywhere in the repository)
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import yaml
except ImportError:  # pragma: no cover
    print("check-manifests: PyYAML is missing (apt-get install python3-yaml, or pip install pyyaml)")
    sys.exit(2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
failures = []
checked = 0


def check(cond, msg):
    global checked
    checked += 1
    if not cond:
        failures.append(msg)
    return cond


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def files_under(rel, exts):
    out = []
    for dirpath, _, names in os.walk(os.path.join(ROOT, rel)):
        for n in sorted(names):
            if n.endswith(exts):
                out.append(os.path.join(dirpath, n))
    return sorted(out)


# ------------------------------------------------------------------ what the code defines
config_rs = read("src/config.rs")
main_rs = read("src/bin/sigrouter/main.rs")
known_env = set(re.findall(r'env\s*=\s*"(SIGROUTER_[A-Z0-9_]+)"', config_rs))
known_env |= set(re.findall(r'"(SIGROUTER_[A-Z0-9_]+)"', main_rs))
check(len(known_env) > 5, f"found only {sorted(known_env)} SIGROUTER_* names in src/config.rs")

metrics_rs = read("src/metrics.rs")
known_metrics = set(re.findall(r'"(sigrouter_[a-z0-9_]+)"', metrics_rs))
histograms = set(re.findall(r'hist\(\s*"(sigrouter_[a-z0-9_]+)"', metrics_rs))
check(len(known_metrics) > 10, f"found only {len(known_metrics)} metric names in src/metrics.rs")
check(histograms, "no histogram found in src/metrics.rs (the hist(...) helper changed?)")


def base_metric(name):
    """sigrouter_x_bucket -> sigrouter_x for histograms; other names unchanged."""
    for suf in ("_bucket", "_sum", "_count"):
        if name.endswith(suf) and name[: -len(suf)] in histograms:
            return name[: -len(suf)]
    return name


def metrics_in(expr):
    return {base_metric(m) for m in re.findall(r"\b(sigrouter_[a-z0-9_]+)", expr)}


# ------------------------------------------------------------------ parse everything
docs = []  # (path, document)
for path in files_under("k8s", (".yaml", ".yml")):
    try:
        with open(path, encoding="utf-8") as f:
            for d in yaml.safe_load_all(f):
                if d is not None:
                    docs.append((path, d))
    except yaml.YAMLError as e:
        check(False, f"{path}: YAML does not parse: {e}")
json_docs = []
for path in files_under("k8s", (".json",)) + files_under("grafana", (".json",)):
    try:
        with open(path, encoding="utf-8") as f:
            json_docs.append((path, json.load(f)))
    except ValueError as e:
        check(False, f"{path}: JSON does not parse: {e}")
for path in files_under("grafana", (".yaml", ".yml")):
    try:
        with open(path, encoding="utf-8") as f:
            list(yaml.safe_load_all(f))
    except yaml.YAMLError as e:
        check(False, f"{path}: YAML does not parse: {e}")
for path, d in docs:
    check(isinstance(d, dict) and "kind" in d and "apiVersion" in d,
          f"{path}: a document without kind/apiVersion")


def find(kind, name=None):
    return [d for _, d in docs if isinstance(d, dict) and d.get("kind") == kind
            and (name is None or d.get("metadata", {}).get("name") == name)]


def num(v):
    return float(str(v).strip('"'))


# ------------------------------------------------------------------ Deployment
deps = find("Deployment", "sigrouter")
if check(len(deps) == 1, "k8s/: expected exactly one Deployment named sigrouter"):
    dep = deps[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    ru = spec.get("strategy", {}).get("rollingUpdate", {})
    check(spec.get("strategy", {}).get("type") == "RollingUpdate", "Deployment: strategy must be RollingUpdate")
    check(str(ru.get("maxUnavailable")) == "0", "Deployment: rollingUpdate.maxUnavailable must be 0")
    check(str(ru.get("maxSurge")) == "1", "Deployment: rollingUpdate.maxSurge must be 1")
    containers = [c for c in pod["containers"] if c["name"] == "sigrouter"]
    if check(len(containers) == 1, "Deployment: no container named sigrouter"):
        c = containers[0]
        ports = {p.get("name"): p for p in c.get("ports", [])}

        def port_of(ref):
            return ports[ref]["containerPort"] if isinstance(ref, str) and ref in ports else ref

        check(ports.get("clients", {}).get("protocol") == "UDP" and ports["clients"]["containerPort"] == 7400,
              "Deployment: container port clients must be 7400/UDP")
        check(ports.get("cluster", {}).get("protocol") == "UDP" and ports["cluster"]["containerPort"] == 7401,
              "Deployment: container port cluster must be 7401/UDP")
        rp = c.get("readinessProbe", {}).get("httpGet", {})
        lp = c.get("livenessProbe", {}).get("httpGet", {})
        check(rp.get("path") == "/readyz" and port_of(rp.get("port")) == 9400,
              "Deployment: readinessProbe must be GET /readyz on 9400")
        check(lp.get("path") == "/healthz" and port_of(lp.get("port")) == 9400,
              "Deployment: livenessProbe must be GET /healthz on 9400")

        # Environment: explicit env plus the ConfigMaps pulled in with envFrom.
        env = {}
        order = []
        for e in c.get("env", []):
            env[e["name"]] = e
            order.append(e["name"])
        for ef in c.get("envFrom", []):
            ref = ef.get("configMapRef", {}).get("name")
            cms = find("ConfigMap", ref)
            if check(len(cms) == 1, f"Deployment: envFrom ConfigMap {ref} not found under k8s/"):
                for k, v in cms[0].get("data", {}).items():
                    env.setdefault(k, {"name": k, "value": v})
        for name in env:
            if name.startswith("SIGROUTER_"):
                check(name in known_env, f"Deployment: {name} is not read by sigrouter (src/config.rs)")

        def val(name):
            return str(env.get(name, {}).get("value", ""))

        nid = env.get("SIGROUTER_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {})
        check(nid.get("fieldPath") == "metadata.name", "Deployment: SIGROUTER_NODE_ID must come from metadata.name")
        pip = env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {})
        check(pip.get("fieldPath") == "status.podIP", "Deployment: POD_IP must come from status.podIP")
        check(val("SIGROUTER_ADVERTISE") == "$(POD_IP):7401", "Deployment: SIGROUTER_ADVERTISE must be $(POD_IP):7401")
        if "POD_IP" in order and "SIGROUTER_ADVERTISE" in order:
            check(order.index("POD_IP") < order.index("SIGROUTER_ADVERTISE"),
                  "Deployment: POD_IP must be defined before SIGROUTER_ADVERTISE for $(POD_IP) to expand")
        check(val("SIGROUTER_REDIS_URL").startswith("redis"), "Deployment: SIGROUTER_REDIS_URL missing")
        check(val("SIGROUTER_CLUSTER_LISTEN").endswith(":7401"), "Deployment: SIGROUTER_CLUSTER_LISTEN must end in :7401")
        check(val("SIGROUTER_METRICS_LISTEN").endswith(":9400"), "Deployment: SIGROUTER_METRICS_LISTEN must end in :9400")

        drain = num(val("SIGROUTER_DRAIN_SECS") or 20)
        grace = num(val("SIGROUTER_SHUTDOWN_GRACE_SECS") or 5)
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        check(tgps > drain + grace,
              f"Deployment: terminationGracePeriodSeconds {tgps} must exceed drain {drain} + shutdown grace {grace}")

        key_file = val("SIGROUTER_CLUSTER_KEY_FILE")
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        mounted = False
        for m in c.get("volumeMounts", []):
            v = vols.get(m["name"], {})
            if "secret" in v and key_file.startswith(m["mountPath"].rstrip("/") + "/"):
                rel = key_file[len(m["mountPath"].rstrip("/")) + 1:]
                items = v["secret"].get("items")
                mounted = items is None or any(i.get("path") == rel for i in items)
        check(mounted, f"Deployment: SIGROUTER_CLUSTER_KEY_FILE {key_file!r} is not a file of a mounted Secret")

    ann = spec["template"].get("metadata", {}).get("annotations", {})
    has_sm = bool(find("ServiceMonitor"))
    check(has_sm or ann.get("prometheus.io/scrape") == "true",
          "k8s/: neither a ServiceMonitor nor prometheus.io/scrape annotations")

# ------------------------------------------------------------------ Services, PDB
svcs = find("Service")
client_svc = [s for s in svcs if any(p.get("port") == 7400 and p.get("protocol") == "UDP"
                                     for p in s["spec"].get("ports", []))
              and s["spec"].get("selector", {}).get("app.kubernetes.io/name") == "sigrouter"]
check(client_svc, "k8s/: no Service for clients on 7400/UDP")
cluster_svc = [s for s in svcs if s["spec"].get("clusterIP") == "None"
               and any(p.get("port") == 7401 and p.get("protocol") == "UDP" for p in s["spec"].get("ports", []))]
check(cluster_svc, "k8s/: no headless Service for cluster traffic on 7401/UDP")
check(find("PodDisruptionBudget"), "k8s/: no PodDisruptionBudget")
check(find("Deployment", "sigrouter-redis") and find("Service", "sigrouter-redis"),
      "k8s/: the demo Redis Deployment and Service are missing")

# ------------------------------------------------------------------ nginx example
nginx = find("ConfigMap", "sigrouter-nginx-udp")
if check(len(nginx) == 1, "k8s/nginx-udp.conf.yaml: ConfigMap sigrouter-nginx-udp missing"):
    conf = nginx[0]["data"]["nginx.conf"]
    live = "\n".join(line.split("#", 1)[0] for line in conf.splitlines())
    check(re.search(r"listen\s+\d+\s+udp", live), "nginx: no UDP listen")
    check("proxy_responses" not in live, "nginx: proxy_responses ends mappings and loses pushes")
    m = re.search(r"proxy_timeout\s+(\d+)s", live)
    check(m and int(m.group(1)) > 15, "nginx: proxy_timeout must exceed the heartbeat interval (15 s)")
    check(live.count("{") == live.count("}"), "nginx: unbalanced braces")

# ------------------------------------------------------------------ alert rules
rule_exprs = []
for rule_doc in find("PrometheusRule"):
    for g in rule_doc["spec"]["groups"]:
        for r in g["rules"]:
            rule_exprs.append((r.get("alert") or r.get("record"), r["expr"]))
            for m in metrics_in(r["expr"]):
                check(m in known_metrics, f"alert {r.get('alert')}: {m} is not defined in src/metrics.rs")

# ------------------------------------------------------------------ Grafana
dash_exprs = []
dashboards = [(p, d) for p, d in json_docs if p.startswith(os.path.join(ROOT, "grafana"))]
check(dashboards, "grafana/: no dashboard JSON")
for path, d in dashboards:
    rel = os.path.relpath(path, ROOT)
    tmpl = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds = tmpl.get("datasource", {})
    check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
          f"{rel}: needs a 'datasource' variable of type datasource (prometheus)")

    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    used = set()
    for p in walk(d.get("panels", [])):
        if p.get("type") == "row":
            continue
        check(p.get("datasource", {}).get("uid") == "${datasource}",
              f"{rel}: panel {p.get('title')!r} does not use ${{datasource}}")
        for t in p.get("targets", []):
            check(t.get("datasource", {}).get("uid") == "${datasource}",
                  f"{rel}: a query of {p.get('title')!r} does not use ${{datasource}}")
            e = t.get("expr", "")
            dash_exprs.append((p.get("title"), e))
            for m in metrics_in(e):
                used.add(m)
                check(m in known_metrics, f"{rel}: panel {p.get('title')!r} uses {m}, not in src/metrics.rs")
    for m in sorted(known_metrics - used):
        check(False, f"{rel}: no panel for {m} (src/metrics.rs)")

# ------------------------------------------------------------------ PromQL syntax (promtool)
promtool = shutil.which("promtool")
if promtool and (rule_exprs or dash_exprs):
    def grafana_to_promql(e):
        return (e.replace("$__rate_interval", "5m").replace("$__interval", "1m")
                 .replace("$__range", "1h").replace("$instance", ".*"))
    rules = [{"record": f"check:expr_{i}", "expr": grafana_to_promql(e)}
             for i, (_, e) in enumerate(rule_exprs + dash_exprs)]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}, f)
        tmp = f.name
    try:
        r = subprocess.run([promtool, "check", "rules", tmp], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            names = [n for n, _ in rule_exprs + dash_exprs]
            out = r.stdout + r.stderr
            for i in sorted({int(x) for x in re.findall(r"check:expr_(\d+)", out)}) or [None]:
                where = names[i] if i is not None and i < len(names) else "?"
                check(False, f"PromQL does not parse ({where}): {out.strip()[:400]}")
        else:
            check(True, "")
    finally:
        os.unlink(tmp)
else:
    print("check-manifests: promtool not found, PromQL syntax not checked")

# ------------------------------------------------------------------ verdict
if failures:
    for f in failures:
        print(f"FAIL {f}")
    print(f"{checked - len(failures)} passed, {len(failures)} failed")
    sys.exit(1)
print(f"{checked} passed, 0 failed")
