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
    let out = Command::new(bin.join("python"))
        .arg(root.join("deploy/check.py"))
        .arg(&helm)
        .arg(&bin)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "deploy/check.py failed:\n{text}");
    assert!(text.contains("checked against Kubernetes 1.25.0"), "{text}");
}
