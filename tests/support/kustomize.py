"""A small kustomize for tests: renders deploy/kubernetes without kubectl.

It implements only what those kustomizations use and raises `KustomizeError` on anything
else, so a manifest change it does not understand fails loudly instead of rendering wrong.
Order of operations follows kustomize: resources, components, generators, then patches,
namespace, labels, replicas, images; name hashes of generated ConfigMaps come last.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

# Internal marker on generated objects that get a content hash in their name at the end.
_NEEDS_HASH = "test.kustomize/needs-hash"
_KNOWN_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "components",
    "labels",
    "images",
    "replicas",
    "configMapGenerator",
    "patches",
}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# Strategic merge: lists of objects merged by these keys (the fields this repo patches).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
}


class KustomizeError(Exception):
    """The kustomization uses something this renderer does not implement, or is wrong."""


def build(directory: Path) -> list[Resource]:
    """`kustomize build directory`."""
    resources = _process(directory, "Kustomization", [])
    _add_name_hashes(resources)
    return resources


# ------------------------------------------------------------------ accumulation


def _process(directory: Path, kind: str, inherited: list[Resource]) -> list[Resource]:
    spec = _load_kustomization(directory, kind)
    resources = list(inherited)
    for entry in spec.get("resources", []):
        target = directory / entry
        if target.is_dir():
            resources += _process(target, "Kustomization", [])
        else:
            resources += _load_objects(target)
    for entry in spec.get("components", []):
        resources = _process(directory / entry, "Component", resources)
    for generator in spec.get("configMapGenerator", []):
        _generate_config_map(directory, generator, resources)
    for patch in spec.get("patches", []):
        _patch(directory, patch, resources)
    if "namespace" in spec:
        _set_namespace(resources, spec["namespace"])
    for labels in spec.get("labels", []):
        _add_labels(resources, labels)
    for replicas in spec.get("replicas", []):
        _set_replicas(resources, replicas)
    for image in spec.get("images", []):
        _set_image(resources, image)
    return resources


def _load_kustomization(directory: Path, kind: str) -> dict[str, Any]:
    path = directory / "kustomization.yaml"
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or spec.get("kind", "Kustomization") != kind:
        raise KustomizeError(f"{path}: expected a {kind}")
    unknown = set(spec) - _KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{path}: unsupported fields {sorted(unknown)}")
    return spec


def _load_objects(path: Path) -> list[Resource]:
    objects = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for obj in objects:
        if not isinstance(obj, dict) or "kind" not in obj or "metadata" not in obj:
            raise KustomizeError(f"{path}: not a Kubernetes object: {obj!r}")
    return objects


def _find(resources: list[Resource], kind: str, name: str) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]


# ------------------------------------------------------------------ generators


def _generate_config_map(
    directory: Path, generator: dict[str, Any], resources: list[Resource]
) -> None:
    unknown = set(generator) - {"name", "files", "literals", "behavior"}
    if unknown:
        raise KustomizeError(f"configMapGenerator: unsupported fields {sorted(unknown)}")
    data: dict[str, str] = {}
    for entry in generator.get("files", []):
        key, sep, file = entry.partition("=")
        path = directory / (file if sep else key)
        data[key if sep else path.name] = path.read_text()
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    name = generator["name"]
    behavior = generator.get("behavior", "create")
    existing = _find(resources, "ConfigMap", name)
    if behavior == "create":
        if existing:
            raise KustomizeError(f"ConfigMap {name} already exists (use behavior: replace/merge)")
        resources.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "annotations": {_NEEDS_HASH: "true"}},
                "data": data,
            }
        )
    elif behavior in ("replace", "merge"):
        if len(existing) != 1:
            raise KustomizeError(f"behavior {behavior}: no single ConfigMap {name} to change")
        target = existing[0]
        target["data"] = data if behavior == "replace" else {**target.get("data", {}), **data}
    else:
        raise KustomizeError(f"configMapGenerator: unknown behavior {behavior!r}")


# ------------------------------------------------------------------ patches


def _patch(directory: Path, entry: dict[str, Any], resources: list[Resource]) -> None:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown:
        raise KustomizeError(f"patches: unsupported fields {sorted(unknown)}")
    text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
    body = yaml.safe_load(text)
    target = entry.get("target")
    if target is not None:
        if set(target) - {"kind", "name"}:
            raise KustomizeError(f"patch target: only kind and name are supported: {target}")
        matches = _find(resources, target["kind"], target["name"])
    elif isinstance(body, dict):
        matches = _find(resources, body["kind"], body["metadata"]["name"])
    else:
        raise KustomizeError("a JSON 6902 patch needs a target")
    if not matches:
        raise KustomizeError(f"patch matches no resource: {target or body.get('metadata')}")
    for resource in matches:
        if isinstance(body, list):
            for op in body:
                json_patch(resource, op)
        else:
            merged = strategic_merge(resource, body)
            resource.clear()
            resource.update(merged)


def strategic_merge(original: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes strategic merge, for maps, null deletions and the lists in `_MERGE_KEYS`."""
    if isinstance(patch, dict) and any(key.startswith("$") for key in patch):
        raise KustomizeError(f"strategic merge directives are not supported: {list(patch)}")
    if isinstance(patch, dict) and isinstance(original, dict):
        merged = copy.deepcopy(original)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(merged.get(key), value, key)
        return merged
    if isinstance(patch, list) and isinstance(original, list) and field in _MERGE_KEYS:
        key = _MERGE_KEYS[field]
        merged_list = copy.deepcopy(original)
        for item in patch:
            index = next((i for i, o in enumerate(merged_list) if o.get(key) == item[key]), None)
            if index is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[index] = strategic_merge(merged_list[index], item)
        return merged_list
    return copy.deepcopy(patch)


def json_patch(document: Any, op: dict[str, Any]) -> None:
    """Apply one RFC 6902 operation (add, remove, replace) in place."""
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
    if not tokens:
        raise KustomizeError("patching the whole document is not supported")
    parent = document
    for token in tokens[:-1]:
        parent = parent[int(token)] if isinstance(parent, list) else parent[token]
    last = tokens[-1]
    kind = op["op"]
    if isinstance(parent, list):
        if kind == "add":
            index = len(parent) if last == "-" else int(last)
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "remove":
            del parent[int(last)]
        elif kind == "replace":
            parent[int(last)] = copy.deepcopy(op["value"])
        else:
            raise KustomizeError(f"unsupported JSON patch op {kind!r}")
        return
    if kind in ("remove", "replace") and last not in parent:
        raise KustomizeError(f"JSON patch {kind}: {op['path']} does not exist")
    if kind in ("add", "replace"):
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[last]
    else:
        raise KustomizeError(f"unsupported JSON patch op {kind!r}")


# ------------------------------------------------------------------ transformers


def _set_namespace(resources: list[Resource], namespace: str) -> None:
    for resource in resources:
        if resource["kind"] == "Namespace":
            resource["metadata"]["name"] = namespace  # as kustomize does
        elif resource["kind"] not in _CLUSTER_SCOPED:
            resource["metadata"]["namespace"] = namespace


def _add_labels(resources: list[Resource], spec: dict[str, Any]) -> None:
    if spec.get("includeSelectors", False) or set(spec) - {
        "pairs",
        "includeSelectors",
        "includeTemplates",
    }:
        raise KustomizeError(f"labels: only pairs and includeTemplates are supported: {spec}")
    pairs = spec["pairs"]
    for resource in resources:
        resource["metadata"].setdefault("labels", {}).update(pairs)
        if spec.get("includeTemplates", False) and resource["kind"] in _WORKLOADS:
            template = resource["spec"]["template"].setdefault("metadata", {})
            template.setdefault("labels", {}).update(pairs)


def _set_replicas(resources: list[Resource], spec: dict[str, Any]) -> None:
    matches = [
        r for r in resources if r["kind"] in _WORKLOADS and r["metadata"]["name"] == spec["name"]
    ]
    if not matches:
        raise KustomizeError(f"replicas: no workload named {spec['name']}")
    for resource in matches:
        resource["spec"]["replicas"] = spec["count"]


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """`name[:tag][@digest]` -> (name, tag, digest); a registry port is not a tag."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def _set_image(resources: list[Resource], spec: dict[str, Any]) -> None:
    if set(spec) - {"name", "newName", "newTag", "digest"}:
        raise KustomizeError(f"images: unsupported fields {sorted(spec)}")
    for container in _containers(resources):
        name, tag, digest = split_image(container["image"])
        if name != spec["name"]:
            continue
        name = spec.get("newName", name)
        if "newTag" in spec:
            tag, digest = str(spec["newTag"]), None
        if "digest" in spec:
            tag, digest = None, spec["digest"]
        container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def pod_spec(resource: Resource) -> dict[str, Any] | None:
    """The pod spec inside a workload (or a Pod), else None."""
    if resource["kind"] == "Pod":
        return resource["spec"]  # type: ignore[no-any-return]
    if resource["kind"] in _WORKLOADS:
        return resource["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return None


def _containers(resources: list[Resource]) -> Iterator[dict[str, Any]]:
    for resource in resources:
        spec = pod_spec(resource)
        if spec is not None:
            yield from spec.get("initContainers", [])
            yield from spec.get("containers", [])


# ------------------------------------------------------------------ name hashes


def _go_json(value: Any) -> bytes:
    """What Go's json.Marshal writes: sorted keys, compact, HTML characters escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return text.encode()


def config_map_hash(config_map: Resource) -> str:
    """kustomize's name suffix for a ConfigMap (api/hasher/hasher.go, encodeConfigMap)."""
    encoded: dict[str, Any] = {
        "kind": "ConfigMap",
        "name": config_map["metadata"].get("name", ""),
        "data": config_map.get("data", {}),
    }
    if isinstance(config_map.get("binaryData"), dict):
        encoded["binaryData"] = config_map["binaryData"]
    digest = hashlib.sha256(_go_json(encoded)).hexdigest()
    return digest[:10].translate(str.maketrans("013ae", "ghkmt"))


def _add_name_hashes(resources: list[Resource]) -> None:
    renamed: dict[tuple[str | None, str], str] = {}
    for resource in resources:
        annotations = resource["metadata"].get("annotations", {})
        if annotations.pop(_NEEDS_HASH, None) is None:
            continue
        if not annotations:
            del resource["metadata"]["annotations"]
        old = resource["metadata"]["name"]
        new = f"{old}-{config_map_hash(resource)}"
        resource["metadata"]["name"] = new
        renamed[(resource["metadata"].get("namespace"), old)] = new
    for resource in resources:
        spec = pod_spec(resource)
        if spec is not None:
            namespace = resource["metadata"].get("namespace")
            _rename_config_map_refs(
                spec, {old: new for (ns, old), new in renamed.items() if ns == namespace}
            )


def _rename_config_map_refs(spec: dict[str, Any], renamed: dict[str, str]) -> None:
    def rename(name: str) -> str:
        return renamed.get(name, name)

    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            volume["configMap"]["name"] = rename(volume["configMap"]["name"])
        for source in volume.get("projected", {}).get("sources", []):
            if "configMap" in source:
                source["configMap"]["name"] = rename(source["configMap"]["name"])
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("configMapKeyRef")
            if ref is not None:
                ref["name"] = rename(ref["name"])
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                source["configMapRef"]["name"] = rename(source["configMapRef"]["name"])
