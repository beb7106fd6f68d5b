#!/usr/bin/env python3
"""Checks the deployment files against the code they describe.

Renders every kustomize overlay under k8s/overlays/ and k8s/monitoring with `kubectl kustomize`
(into --out, when given, for kubernetes-validate), then asserts:
- every overlay: the sigrouter Deployment's probes (/readyz readiness, /healthz liveness, on
  the metrics port), termination grace above the drain deadline plus the shutdown grace,
  rolling update with maxUnavailable 0 / maxSurge 1, node id from metadata.name, advertise
  from the pod IP, the cluster key file inside a mounted Secret, its own ServiceAccount;
  every SIGROUTER_* variable set (env or the envFrom ConfigMap) is one the binary reads; no
  secret in a ConfigMap (no password variable, no password in a Redis URL); the Services
  (clients on 7400/UDP, a headless cluster Service on 7401/UDP and 9400/TCP), a PDB, a
  NetworkPolicy;
- dev: one replica and the demo Redis StatefulSet and Service;
- prod: an HPA of at least 3 replicas and no replica count in the Deployment, Guaranteed QoS,
  hard zone spread plus hostname spread, the Redis password from a Secret, rediss:// with the
  CA file from a mounted Secret;
- nginx: an nginx Deployment and UDP Service in front of a ClusterIP sigrouter Service, whose
  name nginx.conf uses without a namespace; nginx keeps pushes working (UDP listen,
  proxy_timeout above the heartbeat, no proxy_responses);
- monitoring: the ServiceMonitor and PrometheusRule carry the release label kube-prometheus-stack
  selects on, the ServiceMonitor selects the headless Service and its port, and the
  PrometheusRule's groups are exactly those of k8s/monitoring/sigrouter.rules.yaml;
- the Grafana dashboard uses a ${datasource} Prometheus variable, names only metrics that
  src/metrics/ defines, and has a panel for every metric src/metrics/ defines;
- the alert rules name only sigrouter metrics that src/metrics/ defines, depend on no job
  name, and each has a promtool unit test under k8s/monitoring/tests/ that makes it fire;
- with promtool on PATH: every alert and every dashboard query parses as PromQL;
- no file in the repository refers to files outside it.

Exit status 0 when all checks pass; prints one line per failure otherwise.
Usage: python3 scripts/check-manifests.py [--out DIR] [--write-prometheusrule]
  --write-prometheusrule regenerates k8s/monitoring/prometheusrule.yaml from the rule file.
"""

import argparse
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
RULES = "k8s/monitoring/sigrouter.rules.yaml"
PROMRULE = "k8s/monitoring/prometheusrule.yaml"
RELEASE_LABEL = "release"
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


def write_prometheusrule():
    """PrometheusRule = a header + the rule file's groups under spec (comments kept)."""
    src = read(RULES)
    body = src[src.index("groups:"):]
    text = (
        "# GENERATED from sigrouter.rules.yaml by `python3 scripts/check-manifests.py "
        "--write-prometheusrule`:\n"
        "# edit that file, then regenerate. The alerts are explained in docs/OPERATIONS.md.\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: sigrouter\n"
        "  labels:\n"
        "    app.kubernetes.io/name: sigrouter\n"
        "spec:\n"
        + "".join(("  " + line) if line.strip() else line for line in body.splitlines(True))
    )
    with open(os.path.join(ROOT, PROMRULE), "w", encoding="utf-8") as f:
        f.write(text)


ap = argparse.ArgumentParser()
ap.add_argument("--out", help="write each rendered overlay to DIR/<name>.yaml")
ap.add_argument("--write-prometheusrule", action="store_true")
opts = ap.parse_args()
if opts.write_prometheusrule:
    write_prometheusrule()
    print(f"wrote {PROMRULE}")
    sys.exit(0)

# ------------------------------------------------------------------ what the code defines
config_rs = "".join(read(os.path.relpath(f, ROOT)) for f in files_under("src/config", (".rs",)))
main_rs = read("src/bin/sigrouter/main.rs")
known_env = set(re.findall(r'env\s*=\s*"(SIGROUTER_[A-Z0-9_]+)"', config_rs))
known_env |= set(re.findall(r'"(SIGROUTER_[A-Z0-9_]+)"', main_rs))
check(len(known_env) > 5, f"found only {sorted(known_env)} SIGROUTER_* names in src/config/")

metrics_rs = "".join(read(os.path.relpath(f, ROOT)) for f in files_under("src/metrics", (".rs",)))
known_metrics = set(re.findall(r'"(sigrouter_[a-z0-9_]+)"', metrics_rs))
histograms = set(re.findall(r'hist\(\s*"(sigrouter_[a-z0-9_]+)"', metrics_rs))
check(len(known_metrics) > 10, f"found only {len(known_metrics)} metric names in src/metrics/")
check(histograms, "no histogram found in src/metrics/ (the hist(...) helper changed?)")


def base_metric(name):
    """sigrouter_x_bucket -> sigrouter_x for histograms; other names unchanged."""
    for suf in ("_bucket", "_sum", "_count"):
        if name.endswith(suf) and name[: -len(suf)] in histograms:
            return name[: -len(suf)]
    return name


def metrics_in(expr):
    return {base_metric(m) for m in re.findall(r"\b(sigrouter_[a-z0-9_]+)", expr)}


# ------------------------------------------------------------------ render
kubectl = shutil.which("kubectl")
if not kubectl:
    print("check-manifests: kubectl is missing (scripts/test installs it)")
    sys.exit(2)
overlay_dirs = sorted(
    d for d in os.listdir(os.path.join(ROOT, "k8s/overlays"))
    if os.path.isfile(os.path.join(ROOT, "k8s/overlays", d, "kustomization.yaml"))
)
check(set(overlay_dirs) >= {"dev", "prod", "nginx"}, f"k8s/overlays: expected dev, prod, nginx; found {overlay_dirs}")
renders = {}
for name, rel in [(d, f"k8s/overlays/{d}") for d in overlay_dirs] + [("monitoring", "k8s/monitoring")]:
    r = subprocess.run([kubectl, "kustomize", os.path.join(ROOT, rel)], capture_output=True, text=True, timeout=120)
    if not check(r.returncode == 0, f"{rel}: kubectl kustomize failed: {r.stderr.strip()[:400]}"):
        continue
    docs = [d for d in yaml.safe_load_all(r.stdout) if d is not None]
    renders[name] = docs
    if opts.out:
        os.makedirs(opts.out, exist_ok=True)
        with open(os.path.join(opts.out, f"{name}.yaml"), "w", encoding="utf-8") as f:
            f.write(r.stdout)
    for d in docs:
        check(isinstance(d, dict) and "kind" in d and "apiVersion" in d,
              f"{rel}: a document without kind/apiVersion")


def find(docs, kind, name=None):
    return [d for d in docs if isinstance(d, dict) and d.get("kind") == kind
            and (name is None or d.get("metadata", {}).get("name") == name)]


def num(v):
    return float(str(v).strip('"'))


def container(dep, name):
    cs = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return cs[0] if cs else None


def env_of(docs, c):
    """Explicit env plus the ConfigMaps pulled in with envFrom, in order."""
    env, order = {}, []
    for e in c.get("env", []):
        env[e["name"]] = e
        order.append(e["name"])
    for ef in c.get("envFrom", []):
        ref = ef.get("configMapRef", {}).get("name")
        cms = find(docs, "ConfigMap", ref)
        if check(len(cms) == 1, f"envFrom ConfigMap {ref} not found in the render"):
            for k, v in cms[0].get("data", {}).items():
                env.setdefault(k, {"name": k, "value": v})
    return env, order


def url_has_password(url):
    for u in url.split(","):
        auth = u.split("://", 1)[-1].split("/", 1)[0]
        if "@" in auth:
            return True
    return False


def check_fleet(ov, docs):
    """Checks every overlay shares: the sigrouter Deployment, Services, PDB, policy."""
    deps = find(docs, "Deployment", "sigrouter")
    if not check(len(deps) == 1, f"{ov}: expected exactly one Deployment named sigrouter"):
        return None
    dep = deps[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    ru = spec.get("strategy", {}).get("rollingUpdate", {})
    check(spec.get("strategy", {}).get("type") == "RollingUpdate", f"{ov}: strategy must be RollingUpdate")
    check(str(ru.get("maxUnavailable")) == "0", f"{ov}: rollingUpdate.maxUnavailable must be 0")
    check(str(ru.get("maxSurge")) == "1", f"{ov}: rollingUpdate.maxSurge must be 1")
    sa = pod.get("serviceAccountName")
    check(sa and find(docs, "ServiceAccount", sa), f"{ov}: the Deployment needs its own ServiceAccount")
    check(pod.get("automountServiceAccountToken") is False, f"{ov}: no service-account token is needed")
    c = container(dep, "sigrouter")
    if not check(c is not None, f"{ov}: no container named sigrouter"):
        return dep
    ports = {p.get("name"): p for p in c.get("ports", [])}

    def port_of(ref):
        return ports[ref]["containerPort"] if isinstance(ref, str) and ref in ports else ref

    check(ports.get("clients", {}).get("protocol") == "UDP" and ports["clients"]["containerPort"] == 7400,
          f"{ov}: container port clients must be 7400/UDP")
    check(ports.get("cluster", {}).get("protocol") == "UDP" and ports["cluster"]["containerPort"] == 7401,
          f"{ov}: container port cluster must be 7401/UDP")
    rp = c.get("readinessProbe", {}).get("httpGet", {})
    lp = c.get("livenessProbe", {}).get("httpGet", {})
    check(rp.get("path") == "/readyz" and port_of(rp.get("port")) == 9400,
          f"{ov}: readinessProbe must be GET /readyz on 9400")
    check(lp.get("path") == "/healthz" and port_of(lp.get("port")) == 9400,
          f"{ov}: livenessProbe must be GET /healthz on 9400")

    env, order = env_of(docs, c)
    for name in env:
        if name.startswith("SIGROUTER_"):
            check(name in known_env, f"{ov}: {name} is not read by sigrouter (src/config/)")

    def val(name):
        return str(env.get(name, {}).get("value", ""))

    nid = env.get("SIGROUTER_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {})
    check(nid.get("fieldPath") == "metadata.name", f"{ov}: SIGROUTER_NODE_ID must come from metadata.name")
    pip = env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {})
    check(pip.get("fieldPath") == "status.podIP", f"{ov}: POD_IP must come from status.podIP")
    check(val("SIGROUTER_ADVERTISE") == "$(POD_IP):7401", f"{ov}: SIGROUTER_ADVERTISE must be $(POD_IP):7401")
    if "POD_IP" in order and "SIGROUTER_ADVERTISE" in order:
        check(order.index("POD_IP") < order.index("SIGROUTER_ADVERTISE"),
              f"{ov}: POD_IP must be defined before SIGROUTER_ADVERTISE for $(POD_IP) to expand")
    check(val("SIGROUTER_REDIS_URL").startswith("redis"), f"{ov}: SIGROUTER_REDIS_URL missing")
    check(not url_has_password(val("SIGROUTER_REDIS_URL")),
          f"{ov}: SIGROUTER_REDIS_URL carries a password: use the Secret (SIGROUTER_REDIS_PASSWORD)")
    check(val("SIGROUTER_CLUSTER_LISTEN").endswith(":7401"), f"{ov}: SIGROUTER_CLUSTER_LISTEN must end in :7401")
    check(val("SIGROUTER_METRICS_LISTEN").endswith(":9400"), f"{ov}: SIGROUTER_METRICS_LISTEN must end in :9400")

    drain = num(val("SIGROUTER_DRAIN_SECS") or 20)
    grace = num(val("SIGROUTER_SHUTDOWN_GRACE_SECS") or 5)
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    check(tgps > drain + grace,
          f"{ov}: terminationGracePeriodSeconds {tgps} must exceed drain {drain} + shutdown grace {grace}")

    vols = {v["name"]: v for v in pod.get("volumes", [])}

    def in_secret(path):
        """The Secret a file path is mounted from (with the key), or None."""
        for m in c.get("volumeMounts", []):
            v = vols.get(m["name"], {})
            base = m["mountPath"].rstrip("/") + "/"
            if "secret" in v and path.startswith(base):
                rel = path[len(base):]
                items = v["secret"].get("items")
                if items is None:
                    return v["secret"]["secretName"], rel
                for i in items:
                    if i.get("path") == rel:
                        return v["secret"]["secretName"], i["key"]
        return None

    key_file = val("SIGROUTER_CLUSTER_KEY_FILE")
    check(in_secret(key_file), f"{ov}: SIGROUTER_CLUSTER_KEY_FILE {key_file!r} is not a file of a mounted Secret")
    # Secrets never in a ConfigMap.
    for cm in find(docs, "ConfigMap"):
        for k, v in (cm.get("data") or {}).items():
            check(k not in ("SIGROUTER_REDIS_PASSWORD",) and not re.search(r"PASSWORD$|_KEY$", k),
                  f"{ov}: ConfigMap {cm['metadata']['name']} holds a secret ({k}): use a Secret")

    ann = spec["template"].get("metadata", {}).get("annotations", {})
    check(ann.get("prometheus.io/scrape") == "true" and str(ann.get("prometheus.io/port")) == "9400",
          f"{ov}: pod annotations for annotation-based scraping are missing")

    svcs = find(docs, "Service")
    client_svc = [s for s in svcs if any(p.get("port") == 7400 and p.get("protocol") == "UDP"
                                         for p in s["spec"].get("ports", []))
                  and s["spec"].get("selector", {}).get("app.kubernetes.io/name") == "sigrouter"]
    check(len(client_svc) == 1, f"{ov}: no Service for clients on 7400/UDP")
    cluster_svc = [s for s in svcs if s["spec"].get("clusterIP") == "None"
                   and any(p.get("port") == 7401 and p.get("protocol") == "UDP" for p in s["spec"].get("ports", []))
                   and any(p.get("name") == "metrics" and p.get("port") == 9400 for p in s["spec"].get("ports", []))]
    check(cluster_svc, f"{ov}: no headless Service for cluster traffic on 7401/UDP and metrics on 9400")
    check(find(docs, "PodDisruptionBudget"), f"{ov}: no PodDisruptionBudget")
    check(find(docs, "NetworkPolicy", "sigrouter"), f"{ov}: no NetworkPolicy")
    return dep


def resources_guaranteed(c):
    r = c.get("resources", {})
    req, lim = r.get("requests", {}), r.get("limits", {})
    return all(k in req and k in lim and str(req[k]) == str(lim[k]) for k in ("cpu", "memory"))


# ------------------------------------------------------------------ overlays
deps = {}
for ov in overlay_dirs:
    if ov in renders:
        deps[ov] = check_fleet(f"k8s/overlays/{ov}", renders[ov])

if renders.get("dev") and deps.get("dev"):
    docs = renders["dev"]
    check(deps["dev"]["spec"].get("replicas") == 1, "dev: the Deployment must have one replica")
    check(find(docs, "StatefulSet", "sigrouter-redis") and find(docs, "Service", "sigrouter-redis"),
          "dev: the demo Redis StatefulSet and Service are missing")
    check(not find(docs, "HorizontalPodAutoscaler"), "dev: no HPA expected")

if renders.get("prod") and deps.get("prod"):
    docs, dep = renders["prod"], deps["prod"]
    ov = "k8s/overlays/prod"
    hpas = find(docs, "HorizontalPodAutoscaler", "sigrouter")
    if check(len(hpas) == 1, f"{ov}: no HorizontalPodAutoscaler"):
        h = hpas[0]["spec"]
        check(h["scaleTargetRef"].get("kind") == "Deployment" and h["scaleTargetRef"].get("name") == "sigrouter",
              f"{ov}: the HPA must scale Deployment sigrouter")
        check(h.get("minReplicas", 1) >= 3 and h["maxReplicas"] >= h["minReplicas"],
              f"{ov}: the HPA must keep at least 3 replicas")
    check("replicas" not in dep["spec"], f"{ov}: no replica count in the Deployment (the HPA owns it)")
    pod = dep["spec"]["template"]["spec"]
    for c in pod["containers"]:
        check(resources_guaranteed(c), f"{ov}: container {c['name']} is not Guaranteed QoS (requests = limits, cpu and memory)")
    c = container(dep, "sigrouter")
    if c:
        mem = str(c["resources"]["limits"]["memory"])
        gib = float(mem[:-2]) * (1 if mem.endswith("Gi") else 1 / 1024) if mem.endswith(("Gi", "Mi")) else 0
        env, _ = env_of(docs, c)
        sessions = num(env.get("SIGROUTER_MAX_SESSIONS", {}).get("value", 1000000))
        check(sessions >= 1_000_000 and gib >= 1.5, f"{ov}: sized for {sessions} sessions in {mem}: a million sessions need about 1 GB plus headroom")
        pw = env.get("SIGROUTER_REDIS_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef")
        pwf = env.get("SIGROUTER_REDIS_PASSWORD_FILE")
        check(pw or pwf, f"{ov}: the Redis password must come from a Secret")
        url = str(env.get("SIGROUTER_REDIS_URL", {}).get("value", ""))
        check(url.startswith("rediss"), f"{ov}: production Redis must use TLS (rediss://)")
        ca = str(env.get("SIGROUTER_REDIS_CA_FILE", {}).get("value", ""))
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        mounted = any(ca.startswith(m["mountPath"].rstrip("/") + "/") and "secret" in vols.get(m["name"], {})
                      for m in c.get("volumeMounts", []))
        check(ca and mounted, f"{ov}: SIGROUTER_REDIS_CA_FILE must be a file of a mounted Secret")
    spread = {t["topologyKey"]: t for t in pod.get("topologySpreadConstraints", [])}
    zone = spread.get("topology.kubernetes.io/zone", {})
    check(zone.get("whenUnsatisfiable") == "DoNotSchedule", f"{ov}: zone spread must be hard (DoNotSchedule)")
    check("kubernetes.io/hostname" in spread, f"{ov}: hostname spread missing")

if renders.get("nginx") and deps.get("nginx"):
    docs = renders["nginx"]
    ov = "k8s/overlays/nginx"
    ndeps = find(docs, "Deployment", "sigrouter-nginx")
    nsvcs = [s for s in find(docs, "Service") if s["spec"].get("selector", {}).get("app.kubernetes.io/name") == "sigrouter-nginx"]
    check(ndeps and nsvcs, f"{ov}: the nginx Deployment and its Service are missing")
    check(any(p.get("protocol") == "UDP" and p.get("port") == 7400 for s in nsvcs for p in s["spec"]["ports"]),
          f"{ov}: the nginx Service must take clients on 7400/UDP")
    client = [s for s in find(docs, "Service") if s["spec"].get("selector", {}).get("app.kubernetes.io/name") == "sigrouter"
              and s["spec"].get("clusterIP") != "None"]
    check(client and client[0]["spec"].get("type", "ClusterIP") == "ClusterIP",
          f"{ov}: the sigrouter client Service must be a ClusterIP behind nginx")
    if ndeps:
        pod = ndeps[0]["spec"]["template"]["spec"]
        conf_cm = [v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v]
        cms = [cm for cm in find(docs, "ConfigMap") if cm["metadata"]["name"] in conf_cm]
        if check(len(cms) == 1 and "nginx.conf" in cms[0].get("data", {}), f"{ov}: nginx.conf ConfigMap not mounted"):
            conf = cms[0]["data"]["nginx.conf"]
            live = "\n".join(line.split("#", 1)[0] for line in conf.splitlines())
            check(re.search(r"listen\s+\d+\s+udp", live), "nginx: no UDP listen")
            check("proxy_responses" not in live, "nginx: proxy_responses ends mappings and loses pushes")
            m = re.search(r"proxy_timeout\s+(\d+)s", live)
            check(m and int(m.group(1)) > 15, "nginx: proxy_timeout must exceed the heartbeat interval (15 s)")
            check(live.count("{") == live.count("}"), "nginx: unbalanced braces")
            ups = re.findall(r"server\s+([A-Za-z0-9.-]+):(\d+)\s*;", live)
            names = {s["metadata"]["name"] for s in client}
            check(ups and all(h in names and p == "7400" for h, p in ups),
                  f"nginx: upstream {ups} must be the ClusterIP Service by its short name (any namespace), port 7400")
            check(not any(".svc" in h for h, _ in ups), "nginx: a namespace in the upstream name breaks other namespaces")

# ------------------------------------------------------------------ monitoring
rule_exprs = []
try:
    rules_file = yaml.safe_load(read(RULES))
except (OSError, yaml.YAMLError) as e:
    rules_file = None
    check(False, f"{RULES}: {e}")
if rules_file:
    for g in rules_file["groups"]:
        for r in g["rules"]:
            rule_exprs.append((r.get("alert") or r.get("record"), r["expr"]))
            for m in metrics_in(r["expr"]):
                check(m in known_metrics, f"alert {r.get('alert')}: {m} is not defined in src/metrics/")
            check(not re.search(r'job\s*=~?\s*"', r["expr"]),
                  f"alert {r.get('alert')}: must not depend on the scrape job's name")
# Every alert has a promtool unit test that expects it to fire.
tested = set()
for path in files_under("k8s/monitoring/tests", (".yaml", ".yml")):
    with open(path, encoding="utf-8") as f:
        for t in (yaml.safe_load(f) or {}).get("tests", []):
            for a in t.get("alert_rule_test", []):
                if a.get("exp_alerts"):
                    tested.add(a["alertname"])
for name, _ in rule_exprs:
    check(name in tested, f"alert {name}: no promtool test in k8s/monitoring/tests/ expects it to fire")
mon = renders.get("monitoring", [])
sms, prs = find(mon, "ServiceMonitor"), find(mon, "PrometheusRule")
check(len(sms) == 1 and len(prs) == 1, "k8s/monitoring: expected one ServiceMonitor and one PrometheusRule")
for d in sms + prs:
    check(RELEASE_LABEL in d["metadata"].get("labels", {}),
          f"k8s/monitoring: {d['kind']} lacks the '{RELEASE_LABEL}' label kube-prometheus-stack selects on")
if prs and rules_file:
    check(prs[0]["spec"]["groups"] == rules_file["groups"],
          f"{PROMRULE} differs from {RULES}: run python3 scripts/check-manifests.py --write-prometheusrule")
if sms and renders.get("prod"):
    sel = sms[0]["spec"]["selector"]["matchLabels"]
    port = sms[0]["spec"]["endpoints"][0]["port"]
    hit = [s for s in find(renders["prod"], "Service")
           if all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
    check(len(hit) == 1 and any(p.get("name") == port for p in hit[0]["spec"]["ports"]),
          f"ServiceMonitor: selects {len(hit)} Services; must select the headless one with port {port!r}")

# ------------------------------------------------------------------ Grafana
json_docs = []
for path in files_under("grafana", (".json",)):
    try:
        with open(path, encoding="utf-8") as f:
            json_docs.append((path, json.load(f)))
    except ValueError as e:
        check(False, f"{path}: JSON does not parse: {e}")
dash_exprs = []
check(json_docs, "grafana/: no dashboard JSON")
for path, d in json_docs:
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
                check(m in known_metrics, f"{rel}: panel {p.get('title')!r} uses {m}, not in src/metrics/")
    for m in sorted(known_metrics - used):
        check(False, f"{rel}: no panel for {m} (src/metrics/)")

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

# ------------------------------------------------------------------ self-contained docs
# Nothing may point outside the repository: notes that only exist elsewhere, sibling checkouts,
# or a nickname for the post-mortem instead of saying what happened.
# (Written in pieces so that this file does not match its own patterns in a plain grep.)
forbidden = [
    r"LESSONS" + r"\.md|\.\." + r"/shared|\bthe " + r"seed\b|\bseed'?s?[\s_]+(post-mortem|deadlock|failure|layout|scenario)"
]
r = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True, timeout=60)
if check(r.returncode == 0, "git ls-files failed"):
    me = os.path.relpath(os.path.abspath(__file__), ROOT)
    for rel in r.stdout.decode().split("\0"):
        if not rel or rel == me or rel.endswith(("Cargo.lock", ".png")):
            continue
        try:
            text = read(rel)
        except (OSError, UnicodeDecodeError):
            continue
        for pat in forbidden:
            for m in re.finditer(pat, text, re.IGNORECASE):
                line = text.count("\n", 0, m.start()) + 1
                check(False, f"{rel}:{line}: refers to something outside the repository ({m.group(0)!r})")

# ------------------------------------------------------------------ verdict
if failures:
    for f in failures:
        print(f"FAIL {f}")
    print(f"{checked - len(failures)} passed, {len(failures)} failed")
    sys.exit(1)
print(f"{checked} passed, 0 failed")
