"""Offline checks of nodemesh's rendered Kubernetes manifests.

Run by `cargo xtask manifests` (xtask/src/manifests.rs) with the venv's
Python, which has kubernetes-validate (and its jsonschema):

    python manifests_check.py --min 1.30 --rendered NAME=FILE... --examples FILE...

1. Every rendered object of a built-in kind is validated with
   kubernetes-validate in strict mode (unknown fields are errors) against
   each Kubernetes version from --min to the newest the installed
   kubernetes-validate knows.
2. Every CustomResourceDefinition is checked for the structural-schema rules
   the API server enforces (a type on every node, nothing but value
   validations under anyOf/oneOf/allOf/not, properties and
   additionalProperties not together).
3. Custom resources (the example policies, the overlay's PodMonitor) are
   validated against their CRD's openAPIV3Schema, rendered or known here,
   with unknown fields rejected as `kubectl apply` does by default (strict
   field validation). CEL rules (x-kubernetes-validations) are not
   evaluated. An object of a kind with no schema at all fails the check.
4. Cross-object consistency: what the DaemonSet names exists (service
   account, ConfigMap, keys), the paths of the agent's config are under the
   container's mounts, ports agree between the config, the probes, the
   container, the annotations and the PodMonitor, and the ClusterRole grants
   the agent read access to every policy CRD.

Exits 1 on any error, printing each with its object and field path.
"""

import argparse
import copy
import sys

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv
import yaml
from packaging.version import Version

ERRORS = []


def error(where, msg):
    ERRORS.append(f"{where}: {msg}")
    print(f"ERROR {where}: {msg}")


def name_of(doc):
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{doc.get('kind')}/{(ns + '/') if ns else ''}{meta.get('name')}"


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# --- 2. structural schemas -------------------------------------------------

# What a node under anyOf/oneOf/allOf/not may not carry (structural schemas).
NOT_IN_JUNCTORS = {"type", "description", "default", "additionalProperties", "nullable"}


def schema_props_validator(version):
    """Validates one node of an openAPIV3Schema as the API server reads it
    (JSONSchemaProps: its fields and their types, unknown fields rejected).
    kubernetes-validate checks the nodes under `properties` this way but
    not those under `items` or `additionalProperties`, which its schemas
    leave open: structural() applies this to those."""
    defs = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    props = "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JSONSchemaProps"
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{props}", "$defs": defs["$defs"]})


def structural(schema, path, where, props_validator, in_junctor=False, loose=False):
    if not isinstance(schema, dict):
        error(where, f"{path}: a schema must be a mapping")
        return
    if loose:
        for e in props_validator.iter_errors(schema):
            sub = "".join(f".{p}" for p in e.path)
            error(where, f"{path}{sub}: {e.message}")
    if in_junctor:
        for key in NOT_IN_JUNCTORS & schema.keys():
            error(where, f"{path}: `{key}` is not allowed under anyOf/oneOf/allOf/not")
    elif (
        "type" not in schema
        and not schema.get("x-kubernetes-int-or-string")
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        error(where, f"{path}: no `type` (structural schemas need one on every node)")
    if "properties" in schema and "additionalProperties" in schema:
        error(where, f"{path}: properties and additionalProperties are mutually exclusive")
    props = schema.get("properties", {})
    for req in schema.get("required", []):
        if props and req not in props:
            error(where, f"{path}: required `{req}` is not a property")
    for key, sub in props.items():
        structural(sub, f"{path}.properties.{key}", where, props_validator, in_junctor)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            structural(schema[key], f"{path}.{key}", where, props_validator, in_junctor, loose=True)
    for junctor in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(junctor, [])):
            structural(sub, f"{path}.{junctor}[{i}]", where, props_validator, True)
    if "not" in schema:
        structural(schema["not"], f"{path}.not", where, props_validator, True)


# --- 3. custom resources ---------------------------------------------------


def closed(schema):
    """The schema with unknown fields rejected wherever the API server would
    prune or (strict field validation) reject them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for sub in node.get("properties", {}).values():
            walk(sub)
        for key in ("items", "additionalProperties", "not"):
            walk(node.get(key))
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key, []):
                walk(sub)

    walk(schema)
    return schema


def resource_schema(api_version, kind, spec_schema):
    """A whole object's schema: apiVersion, kind, metadata and the CRD's."""
    schema = closed(spec_schema)
    schema.setdefault("properties", {})
    schema["properties"].update(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                    "namespace": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                },
                "additionalProperties": False,
            },
        }
    )
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    schema["additionalProperties"] = False
    return schema


# The fields of monitoring.coreos.com/v1 PodMonitor that these manifests
# use, as in prometheus-operator's CRD (podmonitors.monitoring.coreos.com,
# operator 0.91): a subset, closed, so a misspelt or misplaced field fails.
# Add a field here (from that CRD) before using it.
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
RELABEL_ACTIONS = [
    a
    for pair in (
        ("replace", "Replace"), ("keep", "Keep"), ("drop", "Drop"), ("hashmod", "HashMod"),
        ("labelmap", "LabelMap"), ("labeldrop", "LabelDrop"), ("labelkeep", "LabelKeep"),
        ("lowercase", "Lowercase"), ("uppercase", "Uppercase"), ("keepequal", "KeepEqual"),
        ("dropequal", "DropEqual"),
    )
    for a in pair
]
STRINGS = {"type": "array", "items": {"type": "string"}}
PODMONITOR_SUBSET = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["selector"],
            "properties": {
                "jobLabel": {"type": "string"},
                "podTargetLabels": STRINGS,
                "namespaceSelector": {
                    "type": "object",
                    "properties": {"any": {"type": "boolean"}, "matchNames": STRINGS},
                },
                "selector": {
                    "type": "object",
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "port": {"type": "string"},
                            "portNumber": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "path": {"type": "string"},
                            "scheme": {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            "relabelings": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "action": {"type": "string", "enum": RELABEL_ACTIONS},
                                        "modulus": {"type": "integer"},
                                        "regex": {"type": "string"},
                                        "replacement": {"type": "string"},
                                        "separator": {"type": "string"},
                                        "sourceLabels": STRINGS,
                                        "targetLabel": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
KNOWN_CUSTOM = {("monitoring.coreos.com/v1", "PodMonitor"): PODMONITOR_SUBSET}


def crd_schemas(crds):
    out = {}
    for crd in crds:
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                api_version = f"{spec['group']}/{version['name']}"
                out[(api_version, spec["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return out


def check_custom(doc, where, schemas):
    key = (doc.get("apiVersion"), doc.get("kind"))
    spec_schema = schemas.get(key)
    if spec_schema is None:
        error(where, f"no schema for {key[0]} {key[1]}: neither built in nor a known CRD")
        return False
    validator = jsonschema.Draft202012Validator(resource_schema(key[0], key[1], spec_schema))
    ok = True
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
        path = ".".join(str(p) for p in e.path) or "(object)"
        error(where, f"{path}: {e.message}")
        ok = False
    return ok


# --- 4. consistency --------------------------------------------------------


def port_of(address):
    return int(str(address).rsplit(":", 1)[1])


def under(path, mounts):
    path = str(path).rstrip("/")
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def check_consistency(docs, where_prefix):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    for ds in by_kind.get("DaemonSet", []):
        where = f"{where_prefix}: {name_of(ds)}"
        ns = ds["metadata"].get("namespace")
        pod = ds["spec"]["template"]
        pod_spec = pod["spec"]
        sa = pod_spec.get("serviceAccountName")
        if not any(
            s["metadata"]["name"] == sa and s["metadata"].get("namespace") == ns
            for s in by_kind.get("ServiceAccount", [])
        ):
            error(where, f"serviceAccountName {sa} is not a ServiceAccount of {ns} in the render")
        selector = ds["spec"]["selector"].get("matchLabels", {})
        labels = pod["metadata"].get("labels", {})
        if any(labels.get(k) != v for k, v in selector.items()):
            error(where, "spec.selector does not match the pod template's labels")
        configmaps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
        agent_config = None
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        for vol in volumes.values():
            sources = [s.get("configMap") for s in vol.get("projected", {}).get("sources", [])]
            sources.append(vol.get("configMap"))
            for cm in filter(None, sources):
                found = configmaps.get(cm["name"])
                if found is None:
                    error(where, f"volume {vol['name']}: ConfigMap {cm['name']} is not in the render")
                    continue
                for item in cm.get("items", []):
                    if item["key"] not in found.get("data", {}):
                        error(where, f"volume {vol['name']}: ConfigMap {cm['name']} has no key {item['key']}")
                    elif item["key"] == "agent.yaml":
                        agent_config = yaml.safe_load(found["data"]["agent.yaml"])
        for c in pod_spec["containers"]:
            cwhere = f"{where} container {c['name']}"
            mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    error(cwhere, f"volumeMount {m['name']} has no volume")
            if agent_config is None:
                continue
            if not isinstance(agent_config, dict):
                error(cwhere, "agent.yaml is not a mapping")
                continue
            check_agent_config(agent_config, c, mounts, pod, cwhere)
    for pm in by_kind.get("PodMonitor", []):
        where = f"{where_prefix}: {name_of(pm)}"
        want = pm["spec"]["selector"].get("matchLabels", {})
        targets = [
            ds
            for ds in by_kind.get("DaemonSet", [])
            if ds["metadata"].get("namespace") == pm["metadata"].get("namespace")
            and all(ds["spec"]["template"]["metadata"].get("labels", {}).get(k) == v for k, v in want.items())
        ]
        if not targets:
            error(where, "its selector matches no DaemonSet's pods in its namespace")
        for ep in pm["spec"].get("podMetricsEndpoints", []):
            for ds in targets:
                names = {
                    p.get("name")
                    for c in ds["spec"]["template"]["spec"]["containers"]
                    for p in c.get("ports", [])
                }
                if ep.get("port") not in names:
                    error(where, f"port {ep.get('port')} is no container port name of {name_of(ds)}")
    roles = by_kind.get("ClusterRole", [])
    for crd in by_kind.get("CustomResourceDefinition", []):
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        if group.startswith("security.") and not any(
            group in r.get("apiGroups", [])
            and plural in r.get("resources", [])
            and {"get", "list", "watch"} <= set(r.get("verbs", []))
            for role in roles
            for r in role.get("rules", [])
        ):
            error(f"{where_prefix}: {name_of(crd)}", "no ClusterRole lets the agent get/list/watch it")


def check_agent_config(cfg, container, mounts, pod, where):
    if "workloadsFile" in cfg or "kubernetes" not in cfg:
        error(where, "agent.yaml: Kubernetes mode needs `kubernetes` and no workloadsFile")
    paths = {
        "caCertFile": cfg.get("caCertFile"),
        "caKeyFile": cfg.get("caKeyFile"),
        "trustBundleFile": cfg.get("trustBundleFile"),
        "bpffsDir": cfg.get("bpffsDir"),
        "stateDir": cfg.get("stateDir"),
        "cgroupRoot": cfg.get("cgroupRoot"),
        "accessLog": cfg.get("accessLog"),
        "policyDir": cfg.get("policyDir"),
    }
    cni = cfg.get("cni") or {}
    install = cni.get("install") or {}
    paths.update(
        {
            "cni.socketPath": cni.get("socketPath"),
            "cni.procRoot": cni.get("procRoot"),
            "cni.netnsDir": cni.get("netnsDir"),
            "cni.install.binDir": install.get("binDir"),
            "cni.install.confDir": install.get("confDir"),
        }
    )
    for key, path in paths.items():
        if path and not under(path, mounts):
            error(where, f"agent.yaml {key} {path} is under none of the container's volumeMounts")
    ports = {p["containerPort"] for p in container.get("ports", [])}
    if "statsAddress" in cfg and port_of(cfg["statsAddress"]) not in ports:
        error(where, f"agent.yaml statsAddress {cfg['statsAddress']}: no containerPort {port_of(cfg['statsAddress'])}")
    annotations = pod["metadata"].get("annotations", {})
    if "statsAddress" in cfg and annotations.get("prometheus.io/port") != str(port_of(cfg["statsAddress"])):
        error(where, "annotation prometheus.io/port is not agent.yaml's statsAddress port")
    for probe in ("readinessProbe", "livenessProbe"):
        got = container.get(probe, {}).get("httpGet", {}).get("port")
        if "readinessAddress" in cfg and got != port_of(cfg["readinessAddress"]):
            error(where, f"{probe} port {got} is not agent.yaml's readinessAddress port")
    excluded = install.get("excludeNamespaces", [])
    own = container.get("env", [])
    if install and "nodemesh-system" not in excluded:
        error(where, "agent.yaml cni.install.excludeNamespaces must hold the agent's own namespace")
    if not any(e.get("name") == "NODE_NAME" for e in own) and not cfg.get("kubernetes", {}).get("nodeName"):
        error(where, "no NODE_NAME in the environment and no kubernetes.nodeName")


# --- main ------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--min", required=True, help="the oldest Kubernetes version claimed")
    p.add_argument("--rendered", nargs="+", default=[], help="NAME=FILE of kustomize output")
    p.add_argument("--examples", nargs="*", default=[], help="files of custom resources")
    args = p.parse_args()

    newest = kv.latest_version()
    versions = sorted(
        {kv.major_minor(v) for v in kv.all_versions() if Version(v) >= Version(args.min)},
        key=Version,
    )
    if not versions or Version(versions[0]) != Version(args.min):
        print(f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for {args.min}")
        return 1
    print(
        f"kubernetes-validate {kubernetes_validate.__version__} (newest schemas: {newest}), "
        f"strict, Kubernetes {', '.join(versions)}"
    )

    all_crds = []
    rendered = []
    for item in args.rendered:
        label, path = item.split("=", 1)
        docs = load(path)
        rendered.append((label, docs))
        all_crds += [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    schemas = dict(KNOWN_CUSTOM)
    schemas.update(crd_schemas(all_crds))
    props_validator = schema_props_validator(newest)
    for crd in all_crds:
        for version in crd["spec"]["versions"]:
            structural(
                version["schema"]["openAPIV3Schema"],
                f"versions[{version['name']}].openAPIV3Schema",
                name_of(crd),
                props_validator,
            )

    for label, docs in rendered:
        counts = {"built-in": 0, "custom": 0}
        for doc in docs:
            where = f"{label}: {name_of(doc)}"
            try:
                kv.validate(doc, versions[0], strict=True)
            except kv.SchemaNotFoundError:
                counts["custom"] += 1
                check_custom(doc, where, schemas)
                continue
            except kv.ValidationError:
                pass  # reported below, per version
            counts["built-in"] += 1
            failed = {}  # one line per error, with the versions it holds for
            for v in versions:
                try:
                    kv.validate(doc, v, strict=True)
                except kv.ValidationError as e:
                    path = ".".join(str(x) for x in e.path) or "(object)"
                    failed.setdefault(f"{path}: {e.message}", []).append(v)
            for msg, vs in failed.items():
                error(f"{where} (Kubernetes {', '.join(vs)})", msg)
        check_consistency(docs, label)
        print(f"{label}: {len(docs)} objects ({counts['built-in']} built-in kinds, {counts['custom']} custom resources)")

    for path in args.examples:
        docs = load(path)
        for doc in docs:
            check_custom(doc, f"{path}: {name_of(doc)}", schemas)
        print(f"{path}: {len(docs)} custom resources")

    if ERRORS:
        print(f"{len(ERRORS)} errors")
        return 1
    print("manifests: all objects valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
