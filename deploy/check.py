#!/usr/bin/env python3
"""Offline checks of everything users apply to a cluster.

- `helm lint --strict` of the chart, with its default values and with every option switched on;
- the rendered chart and examples/ validated strictly (unknown fields are errors) against the
  schemas of every Kubernetes version the chart claims (kubernetes-validate ships them offline);
- custom resources (Barnacle's CRDs from charts/barnacle/crds/, and the snapshot kinds from
  deploy/schemas/) validated against their CRD's openAPIV3Schema, strictly, not skipped; the CRDs
  themselves validated as CustomResourceDefinitions;
- the Dockerfile linted with hadolint.

Usage: check.py HELM TOOLS_VENV_BIN
"""

import copy
import glob
import os
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "charts", "barnacle")
# The Kubernetes versions the chart claims (Chart.yaml kubeVersion >=1.20) that this
# kubernetes-validate ships schemas for: deploy/tools.sh installs two releases (1.28.0 for
# 1.20-1.28, 1.37.0 for 1.25-1.37) and the test runs this script with each.
CLAIMED = (1, 20)
VERSIONS = sorted(
    {v for v in kubernetes_validate.utils.all_versions() if tuple(map(int, v.split(".")[:2])) >= CLAIMED},
    key=lambda v: tuple(map(int, v.split("."))),
)
EVERYTHING_ON = [
    "--set", "storageClass.default=true",
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "disks.perNode.node-a=/mnt/nvme0/barnacle",
    "--set", "imagePullSecrets[0].name=registry",
    "--set", "controller.nodeSelector.role=infra",
    "--set", "dataPlane.priorityClassName=barnacle-data",
    "--set", "disks.capacity=500Gi",
    "--set", "disks.perNodeCapacity.node-a=2Ti",
    "--set", "node.makeHostPathShared=true",
    "--set", "dataPlane.ioFlusherCapability=false",
    "--set", "volumeAttributesClass.enabled=true",
    "--set", "volumeAttributesClass.classes[0].name=barnacle-capped",
    "--set-string", "volumeAttributesClass.classes[0].parameters.maxIops=500",
    "--set", "volumeGroupSnapshots.enabled=true",
]
# Kinds younger than the oldest version claimed, checked from the release that made them GA (the
# chart makes them only when asked to).
SINCE = {("storage.k8s.io", "VolumeAttributesClass"): (1, 34)}

failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL", msg)


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        fail(f"{' '.join(cmd)}:\n{p.stdout}{p.stderr}")
    return p.stdout


def strict(schema):
    """Forbid unknown fields wherever a schema lists its properties (like kubectl --validate=strict)."""
    s = copy.deepcopy(schema)
    # The API server adds these to every custom resource's schema.
    props = s.setdefault("properties", {})
    props.setdefault("apiVersion", {"type": "string"})
    props.setdefault("kind", {"type": "string"})
    props.setdefault("metadata", {"type": "object", "x-kubernetes-preserve-unknown-fields": True})

    def walk(node):
        if isinstance(node, dict):
            # OpenAPI's `nullable` (which the API server honours) in JSON Schema terms.
            if node.get("nullable") and isinstance(node.get("type"), str):
                node["type"] = [node["type"], "null"]
                if "enum" in node:
                    node["enum"] = [*node["enum"], None]
            if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


def crd_schemas():
    """(group, version, kind) -> schema from every CRD we know."""
    out = {}
    files = glob.glob(os.path.join(CHART, "crds", "*.yaml")) + glob.glob(os.path.join(ROOT, "deploy", "schemas", "*.yaml"))
    for f in files:
        for doc in yaml.safe_load_all(open(f)):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            for version in VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except Exception as e:  # noqa: BLE001 - report every kind of validation failure
                    fail(f"{f}: CRD {doc['metadata']['name']} for Kubernetes {version}: {e}")
            spec = doc["spec"]
            for v in spec["versions"]:
                out[(spec["group"], v["name"], spec["names"]["kind"])] = strict(v["schema"]["openAPIV3Schema"])
    return out


def check_docs(source, docs, crds):
    for doc in docs:
        if not doc:
            continue
        api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        group, _, version = api.rpartition("/")
        name = f"{source}: {kind} {doc.get('metadata', {}).get('name')}"
        if group in ("barnacle.dev", "snapshot.storage.k8s.io") and (group, version, kind) not in crds:
            fail(f"{name}: no CRD schema for {api} {kind}")
            continue
        if (group, version, kind) in crds:
            try:
                jsonschema.validate(doc, crds[(group, version, kind)])
            except jsonschema.ValidationError as e:
                fail(f"{name}: {e.message} at {list(e.absolute_path)}")
            continue
        if group == "monitoring.coreos.com":
            # The ServiceMonitor's schema comes with the Prometheus Operator; check its shape here.
            if set(doc["spec"]) - {"selector", "endpoints", "namespaceSelector", "jobLabel"}:
                fail(f"{name}: unexpected ServiceMonitor fields")
            continue
        since = SINCE.get((group, kind), CLAIMED)
        for v in VERSIONS:
            if tuple(map(int, v.split(".")[:2])) < since:
                continue
            try:
                kubernetes_validate.validate(doc, v, strict=True)
            except Exception as e:  # noqa: BLE001
                fail(f"{name} for Kubernetes {v}: {e}")


def main():
    helm, tools = sys.argv[1], sys.argv[2]
    crds = crd_schemas()
    for extra in ([], EVERYTHING_ON):
        run([helm, "lint", "--strict", CHART, *extra])
        rendered = run([helm, "template", "barnacle", CHART, "--namespace", "barnacle", *extra])
        check_docs("helm template " + " ".join(extra), list(yaml.safe_load_all(rendered)), crds)
    for f in sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")) + glob.glob(os.path.join(ROOT, "deploy", "samples", "*.yaml"))):
        check_docs(os.path.relpath(f, ROOT), list(yaml.safe_load_all(open(f))), crds)
    run([os.path.join(tools, "hadolint"), os.path.join(ROOT, "Dockerfile")])
    print(f"checked against Kubernetes {', '.join(VERSIONS)}; {len(crds)} custom resource schemas")
    if failures:
        print(f"{len(failures)} failure(s)")
        sys.exit(1)


if __name__ == "__main__":
    main()
