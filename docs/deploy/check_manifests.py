#!/usr/bin/env python3
"""Cross-checks the Kubernetes manifests in docs/deploy/kubernetes/ against each other, the
Dockerfile and the binaries' flags: what the schema check (kubernetes-validate) cannot see.

Usage: check_manifests.py [--self-test]

Each check returns a list of problems; any problem fails the run. --self-test first breaks
copies of the manifests in the ways listed in MUTATIONS and fails unless every break is
caught, so a check that can no longer fail is noticed.
"""

import copy
import pathlib
import re
import sys

import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
REPO = DEPLOY.parent.parent
MANIFESTS = DEPLOY / "kubernetes"

# Environment variables the manifests may use before the binaries define them: a name listed
# here is only a warning. Empty: every name the manifests use must exist in bins/.
PENDING_ENV: set[str] = set()

# Variables that would hold a secret's value itself: the manifests must use the *_FILE forms.
SECRET_VALUE_ENV = {"RD_TOKEN", "RD_CLIENT_TOKEN", "RD_PEERS", "RD_HEADER"}

# Variables set by the manifests for the pod itself (downward API), not rd flags.
POD_ENV = {"POD_NAME", "POD_NAMESPACE"}


def load():
    """Every object of every manifest, as (file name, object)."""
    objs = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objs.append((str(path.relative_to(MANIFESTS)), doc))
    return objs


def of_kind(objs, kind):
    return [o for _, o in objs if o["kind"] == kind]


def containers(objs):
    """(deployment, pod spec, container) for every container of every Deployment."""
    for d in of_kind(objs, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"]:
            yield d, spec, c


def env_of(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def duration_s(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)?", text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return n / 1000 if unit == "ms" else n * 60 if unit == "m" else n


def port_of(listen):
    return int(listen.rsplit(":", 1)[1])


def selected_pods(objs, selector):
    """Deployments whose pod template carries every label of selector."""
    return [
        d
        for d in of_kind(objs, "Deployment")
        if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]


def check_selectors(objs):
    problems = []
    for d in of_kind(objs, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        if not d["spec"]["selector"]["matchLabels"].items() <= labels.items():
            problems.append(f"deployment/{d['metadata']['name']}: selector does not match its pods")
    for s in of_kind(objs, "Service"):
        if not selected_pods(objs, s["spec"]["selector"]):
            problems.append(f"service/{s['metadata']['name']}: selects no Deployment's pods")
    for p in of_kind(objs, "PodDisruptionBudget"):
        if not selected_pods(objs, p["spec"]["selector"]["matchLabels"]):
            problems.append(f"pdb/{p['metadata']['name']}: selects no Deployment's pods")
    return problems


def check_ports(objs):
    """Service target ports and probe ports name container ports; listeners match them."""
    problems = []
    for s in of_kind(objs, "Service"):
        for d in selected_pods(objs, s["spec"]["selector"]):
            names = {p["name"] for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
            for p in s["spec"]["ports"]:
                if p["targetPort"] not in names:
                    problems.append(
                        f"service/{s['metadata']['name']}: targetPort {p['targetPort']!r} is not a port of "
                        f"deployment/{d['metadata']['name']}"
                    )
    for d, _, c in containers(objs):
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        env = env_of(c)
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in c and c[probe]["httpGet"]["port"] not in ports:
                problems.append(f"{c['name']}: {probe} port is not a container port")
        for var, port in (("RD_LISTEN", "tunnel"), ("RD_ADMIN_LISTEN", "admin"), ("RD_METRICS_LISTEN", "metrics")):
            if var in env and ports.get(port) != port_of(env[var]):
                problems.append(f"{c['name']}: {var}={env[var]} but container port {port!r} is {ports.get(port)}")
    return problems


def check_probes(objs):
    """rd-server: liveness on /livez, readiness on /readyz, both on the admin listener."""
    problems = []
    for _, _, c in containers(objs):
        if c["name"] != "rd-server":
            continue
        for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
            get = c.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or get.get("port") != "admin":
                problems.append(f"rd-server: {probe} should be GET {path} on the admin port")
    return problems


def check_secrets(objs):
    """Secret volumes name existing Secrets and keys; *_FILE variables point at mounted files."""
    problems = []
    secrets = {s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {})) for s in of_kind(objs, "Secret")}
    for _, spec, c in containers(objs):
        files = set()
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            secret = volumes[m["name"]].get("secret")
            if not secret:
                continue
            keys = secrets.get(secret["secretName"])
            if keys is None:
                problems.append(f"{c['name']}: Secret {secret['secretName']!r} is not defined")
                continue
            items = secret.get("items") or [{"key": k, "path": k} for k in keys]
            for it in items:
                if it["key"] not in keys:
                    problems.append(f"{c['name']}: Secret {secret['secretName']!r} has no key {it['key']!r}")
                files.add(f"{m['mountPath'].rstrip('/')}/{it['path']}")
        for name, value in env_of(c).items():
            if name in SECRET_VALUE_ENV:
                problems.append(f"{c['name']}: {name} carries a secret in the pod spec; use its file form")
            if (name.endswith("_FILE") or name in ("RD_AGENT_TOKENS", "RD_ADMIN_AUTH")) and value not in files:
                problems.append(f"{c['name']}: {name}={value} is not a file mounted from a Secret")
        for arg in c.get("command", []) + c.get("args", []):
            if re.search(r"token|password|peers", arg, re.I):
                problems.append(f"{c['name']}: {arg!r} on the command line (visible in ps); use a file")
    return problems


def check_grace(objs):
    """The kubelet's SIGKILL comes after the preStop pause, the drain and time to exit."""
    problems = []
    for _, spec, c in containers(objs):
        grace = env_of(c).get("RD_GRACE_PERIOD")
        if grace is None:
            continue
        pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        total = spec.get("terminationGracePeriodSeconds", 30)
        if total < pre + duration_s(grace) + 1:
            problems.append(
                f"{c['name']}: terminationGracePeriodSeconds {total} < preStop {pre} s + "
                f"RD_GRACE_PERIOD {grace} + time to exit"
            )
    return problems


def check_wiring(objs):
    """RD_PEERS_DNS names the headless Service; agents connect to the rd-server Service."""
    problems = []
    services = {s["metadata"]["name"]: s for s in of_kind(objs, "Service")}
    for _, _, c in containers(objs):
        env = env_of(c)
        targets = []
        if "RD_PEERS_DNS" in env:
            host, port = env["RD_PEERS_DNS"].rsplit(":", 1)
            targets.append(("RD_PEERS_DNS", host, int(port), True))
        if "RD_CONNECT" in env:
            m = re.fullmatch(r"wss?://([^/:]+):(\d+)/connect", env["RD_CONNECT"])
            if not m:
                problems.append(f"{c['name']}: RD_CONNECT {env['RD_CONNECT']!r} is not ws[s]://HOST:PORT/connect")
                continue
            targets.append(("RD_CONNECT", m.group(1), int(m.group(2)), False))
        for var, host, port, headless in targets:
            svc = services.get(host.split(".")[0])
            if svc is None:
                problems.append(f"{c['name']}: {var} host {host!r} is no Service of these manifests")
                continue
            if headless != (svc["spec"].get("clusterIP") == "None"):
                problems.append(f"{c['name']}: {var} should name a {'headless' if headless else 'load-balanced'} Service")
            # /connect is served on the tunnel listener only (the admin one answers 404).
            if port not in {p["port"] for p in svc["spec"]["ports"] if p["targetPort"] == "tunnel"}:
                problems.append(f"{c['name']}: {var} port {port} is not the tunnel port of service/{svc['metadata']['name']}")
    return problems


def check_env_refs(objs):
    """$(VAR) in an env value is expanded only if VAR is defined earlier in the same list;
    otherwise Kubernetes passes the text on as it is."""
    problems = []
    for _, _, c in containers(objs):
        defined = set()
        for e in c.get("env", []):
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value") or ""):
                if ref not in defined:
                    problems.append(f"{c['name']}: {e['name']} refers to $({ref}), not defined before it")
            defined.add(e["name"])
    return problems


def check_image_user(objs):
    """Pods run as the image's non-root user."""
    users = re.findall(r"^USER\s+(\d+):(\d+)\s*$", (DEPLOY / "Dockerfile").read_text(), re.M)
    if len(set(users)) != 1:
        return ["Dockerfile: want exactly one numeric USER uid:gid"]
    uid, gid = map(int, users[0])
    problems = []
    for _, spec, c in containers(objs):
        ctx = spec.get("securityContext", {}) | c.get("securityContext", {})
        if not ctx.get("runAsNonRoot") or (ctx.get("runAsUser"), ctx.get("runAsGroup")) != (uid, gid):
            problems.append(f"{c['name']}: should run as non-root {uid}:{gid}, the image's USER")
    return problems


def known_env():
    names = set()
    for src in (REPO / "bins").rglob("*.rs"):
        names |= set(re.findall(r'env\s*=\s*"(RD_[A-Z0-9_]+)"', src.read_text()))
    return names


def check_env_names(objs, warnings):
    """Every RD_* variable is one the binaries read (typos would be silently ignored)."""
    known = known_env()
    problems = []
    for _, _, c in containers(objs):
        for name in env_of(c):
            if name in POD_ENV or name in known:
                continue
            if name in PENDING_ENV:
                warnings.append(f"{c['name']}: {name} is not defined by the binaries in this tree yet")
            else:
                problems.append(f"{c['name']}: {name} is not an environment variable of any rd binary")
    return problems


CHECKS = [
    check_selectors,
    check_ports,
    check_probes,
    check_secrets,
    check_grace,
    check_wiring,
    check_env_refs,
    check_image_user,
]


def run(objs, warnings):
    problems = []
    for check in CHECKS:
        problems += check(objs)
    problems += check_env_names(objs, warnings)
    return problems


def obj(objs, kind, name):
    return next(o for _, o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def server(objs):
    return obj(objs, "Deployment", "rd-server")["spec"]["template"]["spec"]


def agent(objs):
    return obj(objs, "Deployment", "rd-agent-a")["spec"]["template"]["spec"]["containers"][0]


def set_env(c, name, value):
    c["env"] = [e for e in c["env"] if e["name"] != name] + [{"name": name, "value": value}]


# Each breaks one thing a check above must catch.
MUTATIONS = {
    "service selects nothing": lambda o: obj(o, "Service", "rd-server")["spec"]["selector"].update(app="x"),
    "pdb selects nothing": lambda o: obj(o, "PodDisruptionBudget", "rd-server")["spec"]["selector"]["matchLabels"].update(app="x"),
    "target port renamed": lambda o: server(o)["containers"][0]["ports"][1].update(name="adm"),
    "listen port moved": lambda o: set_env(server(o)["containers"][0], "RD_LISTEN", ":9000"),
    "readiness on /healthz": lambda o: server(o)["containers"][0]["readinessProbe"]["httpGet"].update(path="/healthz"),
    "secret key missing": lambda o: obj(o, "Secret", "rd-server-tokens")["stringData"].pop("admin-auth"),
    "token in env": lambda o: set_env(server(o)["containers"][0], "RD_TOKEN", "abc"),
    "token on command line": lambda o: server(o)["containers"][0].update(args=["--token", "abc"]),
    "token file not mounted": lambda o: set_env(server(o)["containers"][0], "RD_TOKEN_FILE", "/tmp/t"),
    "grace too short": lambda o: server(o).update(terminationGracePeriodSeconds=30),
    "peers through the load-balanced Service": lambda o: set_env(
        server(o)["containers"][0], "RD_PEERS_DNS", "rd-server.ns.svc.cluster.local:8123"
    ),
    "agent to a wrong port": lambda o: set_env(agent(o), "RD_CONNECT", "ws://rd-server.ns.svc:8124/connect"),
    "namespace not defined": lambda o: agent(o).update(
        env=[e for e in agent(o)["env"] if e["name"] != "POD_NAMESPACE"]
    ),
    "root user": lambda o: server(o)["securityContext"].update(runAsUser=0),
    "misspelt variable": lambda o: set_env(server(o)["containers"][0], "RD_ADMIN_LISTENER", ":8124"),
}


def self_test(objs):
    missed = []
    for name, mutate in MUTATIONS.items():
        broken = copy.deepcopy(objs)
        mutate(broken)
        if not run(broken, []):
            missed.append(name)
    return missed


def main():
    objs = load()
    if "--self-test" in sys.argv[1:]:
        missed = self_test(objs)
        if missed:
            print("check_manifests: these broken manifests were not caught: " + ", ".join(missed))
            return 1
        print(f"check_manifests: self-test caught all {len(MUTATIONS)} broken manifests")
    warnings = []
    problems = run(objs, warnings)
    for w in warnings:
        print(f"check_manifests: warning: {w}")
    for p in problems:
        print(f"check_manifests: {p}")
    if problems:
        return 1
    print(f"check_manifests: {len(objs)} objects consistent ({len(CHECKS) + 1} checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
