//! Unmodified programs under `devproxy run` against the emulated device: the examples give their CPU reference's
//! results bit for bit, and programs that link libcuda, dlopen it, or load it through cudarc all land in the shim.

mod common;

use common::{example, run_plain, stderr, stdout, Sandbox};
use std::path::Path;
use std::process::Command;

#[test]
fn saxpy_under_devproxy_matches_the_cpu_reference() {
    let sb = Sandbox::new();
    let reference = run_plain(&example("saxpy"), &["--cpu", "--n", "100003"]);
    assert!(reference.status.success());
    let out = sb.run_under(None, &example("saxpy"), &["--n", "100003"]);
    assert!(
        out.status.success(),
        "saxpy failed under devproxy:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        stdout(&out),
        stdout(&reference),
        "stderr:\n{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("PASS"));
}

#[test]
fn train_under_devproxy_is_bit_identical_to_the_cpu_reference() {
    let mut sb = Sandbox::new();
    let args = ["--steps", "60", "--log-every", "10"];
    let reference = run_plain(&example("train"), &[&args[..], &["--cpu"]].concat());
    assert!(reference.status.success());
    // Through a named server, so the same server is also asked for its sessions afterwards.
    let sock = sb.serve("a", &[]);
    let out = sb.run_under(Some(&sock), &example("train"), &args);
    assert!(
        out.status.success(),
        "train failed under devproxy:\n{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        stdout(&out),
        stdout(&reference),
        "stderr:\n{}",
        stderr(&out)
    );
    assert!(
        stdout(&out)
            .lines()
            .filter(|l| l.starts_with("step"))
            .count()
            >= 6
    );
}

#[test]
fn devproxy_run_exits_with_the_commands_status() {
    let sb = Sandbox::new();
    let out = sb.run_under(None, Path::new("/bin/sh"), &["-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
}

/// A C program that links -lcuda (resolved at load time through LD_LIBRARY_PATH to the shim).
const LINKED_C: &str = r#"
#include <stdio.h>
typedef int CUresult; typedef int CUdevice;
CUresult cuInit(unsigned int);
CUresult cuDeviceGet(CUdevice*, int);
CUresult cuDeviceGetName(char*, int, CUdevice);
CUresult cuDeviceGetCount(int*);
CUresult cuGraphCreate(void**, unsigned int);
int main(void) {
    CUdevice d; char name[256]; int n = -1; void* g = 0;
    int r = cuInit(0);
    if (r) { printf("cuInit %d\n", r); return 1; }
    cuDeviceGetCount(&n);
    cuDeviceGet(&d, 0);
    cuDeviceGetName(name, sizeof name, d);
    printf("devices %d name %s\n", n, name);
    printf("graph %d\n", cuGraphCreate(&g, 0));
    printf("graph %d\n", cuGraphCreate(&g, 0));
    return 0;
}
"#;

#[test]
fn a_program_linked_against_libcuda_lands_in_the_shim_and_unsupported_calls_say_so_once() {
    let sb = Sandbox::new();
    let src = sb.path("linked.c");
    std::fs::write(&src, LINKED_C).unwrap();
    // Link against the shim under the name libcuda.so, as a program built against the real driver would.
    let libdir = sb.path("lib");
    std::fs::create_dir_all(&libdir).unwrap();
    std::os::unix::fs::symlink(
        common::target_dir().join("libdevproxy_interpose.so"),
        libdir.join("libcuda.so"),
    )
    .unwrap();
    let bin = sb.path("linked");
    let cc = Command::new("cc")
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .arg("-L")
        .arg(&libdir)
        .arg("-lcuda")
        .output();
    let cc = cc.expect("a C compiler (cc) is needed for this test");
    assert!(
        cc.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = sb.run_under(None, &bin, &[]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("devices 1 name "), "{text}");
    assert!(
        text.to_lowercase().contains("emulated"),
        "device name should say it is emulated: {text}"
    );
    // CUDA_ERROR_NOT_SUPPORTED, twice; the log names the function exactly once.
    assert_eq!(text.matches("graph 801").count(), 2, "{text}");
    assert_eq!(
        stderr(&out).matches("cuGraphCreate").count(),
        1,
        "stderr:\n{}",
        stderr(&out)
    );
}

#[test]
fn a_program_that_dlopens_libcuda_lands_in_the_shim() {
    let sb = Sandbox::new();
    let py = r#"
import ctypes
lib = ctypes.CDLL("libcuda.so.1")
assert lib.cuInit(0) == 0, "cuInit failed"
v = ctypes.c_int(0)
assert lib.cuDriverGetVersion(ctypes.byref(v)) == 0
n = ctypes.c_int(0)
assert lib.cuDeviceGetCount(ctypes.byref(n)) == 0
free = ctypes.c_size_t(0); total = ctypes.c_size_t(0)
ctx = ctypes.c_void_p(0)
assert lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0
assert lib.cuCtxSetCurrent(ctx) == 0
assert lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)) == 0
ptr = ctypes.c_uint64(0)
assert lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(1 << 20)) == 0
src = (ctypes.c_ubyte * 1024)(*[i % 251 for i in range(1024)])
dst = (ctypes.c_ubyte * 1024)()
assert lib.cuMemcpyHtoD_v2(ptr, src, ctypes.c_size_t(1024)) == 0
assert lib.cuMemcpyDtoH_v2(dst, ptr, ctypes.c_size_t(1024)) == 0
assert bytes(dst) == bytes(src)
# The per-thread capture mode swaps (PyTorch's capture-mode guard around NCCL work): relaxed (2) in, global (0) out.
mode = ctypes.c_int(2)
assert lib.cuThreadExchangeStreamCaptureMode(ctypes.byref(mode)) == 0 and mode.value == 0
assert lib.cuThreadExchangeStreamCaptureMode(ctypes.byref(mode)) == 0 and mode.value == 2
bad = ctypes.c_int(7)
assert lib.cuThreadExchangeStreamCaptureMode(ctypes.byref(bad)) != 0
print("version", v.value, "devices", n.value, "total", total.value, "roundtrip ok")
"#;
    let out = sb.run_under(None, Path::new("python3"), &["-c", py]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("version 13000 devices 1"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("roundtrip ok"));
}

#[test]
fn no_server_means_an_error_naming_the_socket_not_a_hang() {
    let sb = Sandbox::new();
    let missing = sb.path("nobody-listens.sock");
    let started = std::time::Instant::now();
    let out = sb.run_under(Some(&missing), &example("saxpy"), &["--n", "10"]);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    let err = stderr(&out);
    assert!(
        err.contains(missing.to_str().unwrap()),
        "the log should name the socket it tried:\n{err}"
    );
}

/// The `__global__` kernels of the PTX interpreter's corpus, read from the source so that a kernel added there
/// without a check in examples/kernel_corpus.rs fails this test.
fn corpus_kernels() -> Vec<String> {
    let src = include_str!("../ptx/tests/corpus/kernels.cu");
    let code: String = src
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let names: Vec<String> = code
        .split("__global__")
        .skip(1)
        .map(|rest| {
            let after_void = rest.trim_start().strip_prefix("void").unwrap_or("");
            after_void
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    assert!(
        names.iter().all(|n| !n.is_empty()),
        "a __global__ in kernels.cu that is not `__global__ void NAME(`: {names:?}"
    );
    names
}

#[test]
fn every_corpus_kernel_gives_its_reference_result_under_devproxy() {
    let kernels = corpus_kernels();
    assert!(kernels.len() >= 19, "corpus shrank? {kernels:?}");
    let sb = Sandbox::new();
    let out = sb.run_under(None, &example("kernel_corpus"), &[]);
    let so = stdout(&out);
    assert!(
        out.status.success(),
        "kernel_corpus failed under devproxy:\n{so}\n{}",
        stderr(&out)
    );
    let passed: Vec<&str> = so.lines().filter_map(|l| l.strip_prefix("PASS ")).collect();
    for k in &kernels {
        assert!(
            passed.contains(&k.as_str()),
            "corpus kernel {k} did not PASS:\n{so}"
        );
    }
    assert_eq!(
        passed.len(),
        kernels.len(),
        "PASS lines vs __global__ kernels in kernels.cu:\n{so}"
    );
    assert!(
        so.contains(&format!("corpus: {} passed, 0 failed", kernels.len())),
        "{so}"
    );
}
