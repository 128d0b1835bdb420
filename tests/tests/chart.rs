//! The Helm chart, the examples and the Dockerfile, checked offline by `deploy/check.py`: helm
//! lint --strict, strict schema validation for every Kubernetes version the chart claims (custom
//! resources against their CRD schemas), hadolint. The tools come from `deploy/tools.sh`, which
//! `.ci/run` runs (into $BARNACLE_TOOLS, default /var/tmp/barnacle-tools).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn the_chart_examples_and_dockerfile_pass_the_offline_checks() {
    let tools =
        PathBuf::from(std::env::var("BARNACLE_TOOLS").unwrap_or_else(|_| "/var/tmp/barnacle-tools".into()));
    let helm = tools.join("helm/helm");
    let bin = tools.join("venv/bin");
    assert!(
        helm.exists() && bin.join("kubernetes-validate").exists() && bin.join("hadolint").exists(),
        "the checking tools are missing: run deploy/tools.sh (.ci/run does)"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Two kubernetes-validate releases between them hold the schemas of every version the chart
    // claims (1.20 onwards).
    let mut seen = String::new();
    for python in [bin.join("python"), tools.join("venv-k8s128/bin/python")] {
        assert!(python.exists(), "{} is missing: run deploy/tools.sh", python.display());
        let out =
            Command::new(&python).arg(root.join("deploy/check.py")).arg(&helm).arg(&bin).output().unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "deploy/check.py ({}) failed:\n{text}", python.display());
        seen.push_str(&text);
    }
    for v in ["1.20.0", "1.24.0", "1.25.0", "1.37.0"] {
        assert!(seen.contains(v), "Kubernetes {v} not checked: {seen}");
    }
}
