#!/usr/bin/python3
"""Structural check of Kubernetes manifests, without a cluster.

    /usr/bin/python3 deploy/k8s/validate.py deploy/k8s/           # every *.yaml there
    kubectl kustomize deploy/k8s | /usr/bin/python3 deploy/k8s/validate.py -

Every object is loaded into the model class of the official Python client
(Debian's python3-kubernetes) for its kind, through the client's own
deserializer (the code that reads API server responses), then serialized back
with `sanitize_for_serialization`. The object fails when:

- its apiVersion/kind is not one the client's API has (a `kind: Deploymnet`, an
  `apps/v2`): the kind's model must exist and the group's API class must be able
  to create it;
- a field does not survive the round trip: a field the model does not have (a
  typo, a field at the wrong level) is dropped by the deserializer, and a value
  of the wrong type comes back changed (a number where a string is due);
- a field the model requires is missing (the models refuse to be built);
- its name or a label is not one the API server accepts.

This checks the shape of each object against the client's schema, as `kubectl
apply --dry-run=server` would partly do; it cannot check what only a cluster
knows (admission, quotas, that an image exists). Cross-object references
(selectors, ports, volumes, Secrets) are checked by crates/cellplane/tests/k8s.rs.

`kustomization.yaml` is not an API object: its keys are checked against the
kustomize fields used here. Exit status 1 with one line per problem, 0 if none;
2 when the kubernetes module is missing.
"""

import json
import re
import sys
from pathlib import Path

try:
    import yaml
    import kubernetes.client as k8s
    from kubernetes.client import ApiClient
except ImportError as e:  # the caller (the Rust test) reports why it skipped
    print(f"validate.py: {e}: install Debian's python3-kubernetes", file=sys.stderr)
    sys.exit(2)

# API group (the part of apiVersion before '/'; '' for the core group) -> the
# prefix of the client's API class: CoreV1Api, AppsV1Api, ...
GROUP_API = {
    "": "Core",
    "apps": "Apps",
    "batch": "Batch",
    "policy": "Policy",
    "networking.k8s.io": "Networking",
    "rbac.authorization.k8s.io": "RbacAuthorization",
    "autoscaling": "Autoscaling",
}

# The kustomize fields a Kustomization may use here (kustomize's own schema is
# not in the client).
KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "resources", "secretGenerator", "configMapGenerator",
    "generatorOptions", "namespace", "labels", "commonLabels", "images", "patches",
}
GENERATOR_KEYS = {"name", "files", "literals", "envs", "type", "behavior", "options", "namespace"}
GENERATOR_OPTION_KEYS = {"disableNameSuffixHash", "labels", "annotations", "immutable"}

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def snake(kind):
    """StatefulSet -> stateful_set, as the client's method names spell kinds."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


def model_class(api_version, kind):
    """The client's model class for apiVersion/kind, or a reason there is none."""
    group, _, version = api_version.rpartition("/")
    prefix = GROUP_API.get(group)
    if prefix is None:
        return None, f"apiVersion {api_version}: API group `{group}` is not checked here"
    api = getattr(k8s, f"{prefix}{version.capitalize()}Api", None)
    if api is None:
        return None, f"apiVersion {api_version}: no such version of the API"
    # A kind lives in a group/version if that API can create one (namespaced or
    # cluster-wide).
    method = snake(kind)
    if not any(hasattr(api, f"create_{scope}{method}") for scope in ("namespaced_", "")):
        return None, f"kind {kind}: not a kind of {api_version}"
    cls = getattr(k8s, f"{version.capitalize()}{kind}", None)
    if cls is None:
        return None, f"kind {kind}: the client has no model V{version[1:]}{kind}"
    return cls, None


def diff(original, back, path, problems):
    """Records where `back` (the round trip) differs from `original`."""
    if isinstance(original, dict) and isinstance(back, dict):
        for key, value in original.items():
            here = f"{path}.{key}" if path else key
            if key not in back:
                if value is None:
                    continue  # an explicit null is the same as absent
                problems.append(f"{here}: not a field of the model (dropped): typo or wrong level?")
            else:
                diff(value, back[key], here, problems)
        for key in back.keys() - original.keys():
            problems.append(f"{path}.{key}: appeared in the round trip")
    elif isinstance(original, list) and isinstance(back, list):
        if len(original) != len(back):
            problems.append(f"{path}: {len(original)} items became {len(back)}")
        for i, (a, b) in enumerate(zip(original, back)):
            diff(a, b, f"{path}[{i}]", problems)
    elif type(original) is not type(back) or original != back:
        problems.append(
            f"{path}: {original!r} ({type(original).__name__}) came back as "
            f"{back!r} ({type(back).__name__}): wrong type for the field"
        )


def check_names(obj, problems):
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    kind = obj.get("kind")
    if not name:
        problems.append("metadata.name: missing")
    else:
        # Services (and the pods of StatefulSets, named after them) need DNS labels.
        pattern = DNS_LABEL if kind in ("Service", "StatefulSet") else DNS_SUBDOMAIN
        if len(name) > (63 if pattern is DNS_LABEL else 253) or not pattern.match(name):
            problems.append(f"metadata.name: `{name}` is not a valid {kind} name")
    labels = dict(meta.get("labels") or {})
    template = ((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}
    labels.update(template.get("labels") or {})
    for key, value in labels.items():
        prefix, _, label = str(key).rpartition("/")
        ok_prefix = not prefix or (len(prefix) <= 253 and DNS_SUBDOMAIN.match(prefix))
        ok_name = len(label) <= 63 and LABEL_NAME.match(label)
        if not (ok_prefix and ok_name):
            problems.append(f"label key `{key}` is not valid")
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            problems.append(f"label `{key}`: value {value!r} is not valid (a string of at most 63)")


def check_object(obj, client):
    """Problems of one API object (a dict)."""
    if not isinstance(obj, dict):
        return [f"not a mapping: {obj!r}"]
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not api_version or not kind:
        return ["apiVersion and kind are required"]
    cls, why = model_class(api_version, kind)
    if cls is None:
        return [why]
    problems = []

    class Response:  # what ApiClient.deserialize reads: an API server's answer
        data = json.dumps(obj)

    try:
        model = client.deserialize(Response, cls.__name__)
    except (ValueError, TypeError) as e:
        # The models refuse a missing required field or an unconvertible value.
        return [f"{cls.__name__}: {e}"]
    diff(obj, client.sanitize_for_serialization(model), "", problems)
    check_names(obj, problems)
    return problems


def check_kustomization(obj):
    problems = [f"{k}: not a kustomize field used here" for k in obj.keys() - KUSTOMIZATION_KEYS]
    if obj.get("apiVersion") != "kustomize.config.k8s.io/v1beta1":
        problems.append(f"apiVersion {obj.get('apiVersion')!r}: want kustomize.config.k8s.io/v1beta1")
    for i, gen in enumerate(obj.get("secretGenerator") or []):
        for k in gen.keys() - GENERATOR_KEYS:
            problems.append(f"secretGenerator[{i}].{k}: not a generator field")
        if not gen.get("name"):
            problems.append(f"secretGenerator[{i}].name: missing")
    for k in (obj.get("generatorOptions") or {}).keys() - GENERATOR_OPTION_KEYS:
        problems.append(f"generatorOptions.{k}: not a generator option")
    for r in obj.get("resources") or []:
        if not isinstance(r, str):
            problems.append(f"resources: {r!r} is not a path")
    return problems


def documents(arg):
    """(source, object) for every YAML document of a folder's *.yaml, a file, or stdin."""
    if arg == "-":
        sources = [("<stdin>", sys.stdin.read())]
    else:
        p = Path(arg)
        paths = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
        sources = [(str(x), x.read_text()) for x in paths]
    for name, text in sources:
        for i, doc in enumerate(yaml.safe_load_all(text)):
            if doc is not None:
                yield f"{name}#{i}", doc


def main(args):
    if not args:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: validate.py DIR|FILE|- ...", file=sys.stderr)
        return 2
    client = ApiClient()
    checked, failed = 0, 0
    for arg in args:
        for source, obj in documents(arg):
            checked += 1
            if isinstance(obj, dict) and obj.get("kind") == "Kustomization":
                problems = check_kustomization(obj)
            else:
                problems = check_object(obj, client)
            what = f"{source} {obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}" \
                if isinstance(obj, dict) else source
            for p in problems:
                print(f"{what}: {p}")
            failed += bool(problems)
    if checked == 0:
        print("validate.py: no objects found")
        return 1
    print(f"validate.py: {checked} object(s), {failed} with problems "
          f"(kubernetes client {k8s.__version__ if hasattr(k8s, '__version__') else '?'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
