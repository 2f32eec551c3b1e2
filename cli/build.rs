//! Links the `keel` binary with packed relative relocations (`-z pack-relative-relocs`, DT_RELR)
//! where the toolchain supports them.
//!
//! A position-independent Rust binary carries a relocation for every pointer in its read-only
//! data (vtables, string tables): 1.8 MB of `.rela.dyn` in `keel`, all read at start-up and so
//! resident in every process. DT_RELR packs them into about 20 KB: measured, a TaskManager's
//! resident size went down by 1.75 MiB, with ASLR kept (docs/kafka.md, "Memory"). The flag
//! needs GNU ld 2.38 or lld 15, and glibc 2.36 to run the result, so it is used only when a
//! test link with it succeeds without a warning; `KEEL_NO_RELR=1` turns it off.

use std::io::Write;
use std::process::{Command, Stdio};

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-env-changed=KEEL_NO_RELR");
    println!("cargo:rerun-if-env-changed=CC");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let cross = std::env::var("TARGET").ok() != std::env::var("HOST").ok();
    if target_os != "linux" || target_env != "gnu" || cross || std::env::var_os("KEEL_NO_RELR").is_some() {
        return;
    }
    if links_with_relr() {
        println!("cargo:rustc-link-arg-bins={FLAG}");
    } else {
        println!("cargo:warning=the linker cannot pack relative relocations (-z pack-relative-relocs); keel links without");
    }
}

/// Whether `cc` links a small program with the flag and says nothing (an older GNU ld only
/// warns about a `-z` option it does not know, even with `--fatal-warnings`), and the program
/// runs.
fn links_with_relr() -> bool {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let Some(out_dir) = std::env::var_os("OUT_DIR") else { return false };
    let output = std::path::Path::new(&out_dir).join("relr-probe");
    let child = Command::new(cc)
        .args(["-x", "c", "-", "-o"])
        .arg(&output)
        .args(["-pie", "-fPIE", FLAG])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else { return false };
    let source = b"static int x = 1; int *p = &x; int main(void) { return *p - 1; }\n";
    let wrote = child.stdin.take().is_some_and(|mut stdin| stdin.write_all(source).is_ok());
    let linked = child.wait_with_output().is_ok_and(|out| out.status.success() && out.stderr.is_empty());
    // Run it: a glibc older than 2.36 refuses a binary that needs GLIBC_ABI_DT_RELR.
    wrote && linked && Command::new(&output).status().is_ok_and(|status| status.success())
}
