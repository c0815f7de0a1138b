//! Test helpers: finding cudarc's driver bindings in the cargo registry (they are the table's source of truth).

use std::path::PathBuf;

/// The text of cudarc's `src/driver/sys/mod.rs`, for the version in the workspace's Cargo.lock.
pub fn cudarc_sys_source() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap_or_default();
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"cudarc\""))
        .and_then(|p| {
            p.lines().find_map(|l| {
                l.strip_prefix("version = \"")?
                    .strip_suffix('"')
                    .map(str::to_owned)
            })
        })
        .unwrap_or_else(|| "0.19.10".into());
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let registry = home.join("registry").join("src");
    let dirs = std::fs::read_dir(&registry).unwrap_or_else(|e| {
        panic!("cannot read the cargo registry at {}: {e}; run `cargo fetch` (cudarc's source is needed)", registry.display())
    });
    for d in dirs.flatten() {
        let p = d
            .path()
            .join(format!("cudarc-{version}"))
            .join("src/driver/sys/mod.rs");
        if let Ok(s) = std::fs::read_to_string(&p) {
            return s;
        }
    }
    panic!(
        "cudarc-{version}/src/driver/sys/mod.rs not found under {}; run `cargo fetch` (cudarc is a dependency)",
        registry.display()
    )
}
