//! Hand-written PTX fixtures: instructions NVRTC output rarely shows, and every error path.

mod common;
use common::*;
use devproxy_ptx::{LaunchError, Module, PtxError};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn texture_instruction_is_unsupported_at_load() {
    match Module::parse(&fixture("tex.ptx")) {
        Err(PtxError::Unsupported {
            kernel,
            instruction,
        }) => {
            assert_eq!(kernel, "uses_texture");
            assert!(instruction.contains("tex.2d"), "{instruction}");
        }
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("tex.2d must not load"),
    }
}

#[test]
fn surface_instruction_is_unsupported_at_load() {
    let e = Module::parse(&fixture("suld.ptx"))
        .err()
        .expect("suld must not load");
    let msg = e.to_string();
    assert!(
        matches!(e, PtxError::Unsupported { ref kernel, .. } if kernel == "uses_surface"),
        "{msg}"
    );
    assert!(msg.contains("suld.b.2d"), "{msg}");
}

#[test]
fn parse_errors_carry_the_line() {
    let e = Module::parse(".version 9.0\n.target sm_90\n.address_size 64\n.visible .entry k()\n{\n  add.s32 %r1, ;\n}\n")
        .err()
        .unwrap();
    assert!(matches!(e, PtxError::Parse { line: 6, .. }), "{e}");
}

#[test]
fn hand_written_misc_kernel() {
    let m = Module::parse(&fixture("basic.ptx")).unwrap();
    assert_eq!(m.kernel("misc").unwrap().max_threads_per_block, 64);
    assert_eq!(m.kernel("misc").unwrap().local_bytes_per_thread, 64); // 48 own + 16 for `twice`
    let a = Arena::new(1 << 20);
    let g = place_globals(&m, &a);
    let out = a.alloc(64 * 32);
    launch(
        &m,
        &a,
        &g,
        "misc",
        &cfg([1, 1, 1], [64, 1, 1]),
        Params::new().ptr(out),
    )
    .unwrap();
    let o: Vec<u32> = a.download(out, 64 * 8);
    for t in 0..64u32 {
        let r = &o[t as usize * 8..t as usize * 8 + 8];
        let p1 = t < 10 && t != 3;
        let p2 = t >= 10 && t != 3;
        assert_eq!(r[0], p1 as u32 | (p2 as u32) << 1, "setp t={t}");
        assert_eq!(r[1], 0x3344_1122, "pack");
        assert_eq!(r[2], t + 100, "local");
        assert_eq!(r[3], 32, "bar.red.popc");
        assert_eq!(r[4], 1, "bar.red.or");
        assert_eq!(r[5], 2 * t, "call");
        assert_eq!(r[6], 22 + 0x34, "global + bfe");
        assert_eq!(r[7], 0x1122_3544, "bfi");
    }
    // .maxntid 64 is enforced
    let e = launch(
        &m,
        &a,
        &g,
        "misc",
        &cfg([1, 1, 1], [65, 1, 1]),
        Params::new().ptr(out),
    )
    .unwrap_err();
    assert!(matches!(e, LaunchError::InvalidConfig(_)), "{e}");
}

#[test]
fn out_of_bounds_store_is_illegal_address() {
    let m = Module::parse(&fixture("basic.ptx")).unwrap();
    let a = Arena::new(1 << 16);
    let g = place_globals(&m, &a);
    let e = launch(
        &m,
        &a,
        &g,
        "oob_store",
        &cfg([1, 1, 1], [1, 1, 1]),
        Params::new().ptr(0x1000).u32(5),
    )
    .unwrap_err();
    match e {
        LaunchError::IllegalAddress { kernel, addr } => {
            assert_eq!(kernel, "oob_store");
            assert_eq!(addr, 0x1014);
        }
        e => panic!("wrong error {e}"),
    }
    // one element past the end of the arena
    let end = ARENA_BASE + (1 << 16);
    let e = launch(
        &m,
        &a,
        &g,
        "oob_store",
        &cfg([1, 1, 1], [1, 1, 1]),
        Params::new().ptr(end - 8).u32(2),
    )
    .unwrap_err();
    assert!(
        matches!(e, LaunchError::IllegalAddress { addr, .. } if addr == end),
        "{e}"
    );
    // in bounds works
    launch(
        &m,
        &a,
        &g,
        "oob_store",
        &cfg([1, 1, 1], [1, 1, 1]),
        Params::new().ptr(end - 8).u32(1),
    )
    .unwrap();
}

#[test]
fn deadlock_and_trap_are_errors_not_hangs() {
    let m = Module::parse(&fixture("basic.ptx")).unwrap();
    let a = Arena::new(1 << 16);
    let e = launch(
        &m,
        &a,
        &[0, 0],
        "deadlock",
        &cfg([1, 1, 1], [64, 1, 1]),
        Params::new().ptr(0),
    )
    .unwrap_err();
    assert!(e.to_string().contains("deadlock"), "{e}");
    let e = launch(
        &m,
        &a,
        &[0, 0],
        "traps",
        &cfg([2, 1, 1], [32, 1, 1]),
        Params::new(),
    )
    .unwrap_err();
    assert!(
        matches!(e, LaunchError::Trap { ref kernel } if kernel == "traps"),
        "{e}"
    );
}

#[test]
fn launch_geometry_limits() {
    let (_, m) = corpus();
    let a = Arena::new(1 << 16);
    let g = place_globals(m, &a);
    let p = || Params::new().ptr(0).ptr(0).i32(0);
    for (grid, block) in [
        ([1, 1, 1], [1025, 1, 1]),
        ([1, 1, 1], [1, 1, 65]),
        ([1, 1, 1], [32, 32, 2]),
        ([1, 65536, 1], [32, 1, 1]),
        ([1, 1, 65536], [32, 1, 1]),
        ([0, 1, 1], [32, 1, 1]),
    ] {
        let e = launch(m, &a, &g, "reduce_sum", &cfg(grid, block), p()).unwrap_err();
        assert!(
            matches!(e, LaunchError::InvalidConfig(_)),
            "{grid:?} {block:?}: {e}"
        );
    }
    // the largest legal block works (n = 0: every thread only touches shared memory)
    launch(
        m,
        &a,
        &g,
        "reduce_sum",
        &cfg([1, 1, 1], [1024, 1, 1]),
        Params::new().ptr(0).ptr(a.alloc(4)).i32(0),
    )
    .unwrap_err(); // s[256] is too small for 1024 threads: IllegalAddress, not InvalidConfig
}

#[test]
fn shared_memory_limits() {
    let (_, m) = corpus();
    let a = Arena::new(1 << 20);
    let g = place_globals(m, &a);
    let n = 64usize;
    let dx = a.upload(&vec![1i32; n]);
    let dy = a.alloc(n * 4);
    let p = || Params::new().ptr(dx).ptr(dy).i32(n as i32);
    let mut c = cfg([1, 1, 1], [64, 1, 1]);
    c.dynamic_shared_bytes = 48 * 1024;
    launch(m, &a, &g, "dyn_shared_reverse", &c, p()).unwrap();
    c.dynamic_shared_bytes = 48 * 1024 + 4;
    let e = launch(m, &a, &g, "dyn_shared_reverse", &c, p()).unwrap_err();
    assert!(
        matches!(e, LaunchError::InvalidConfig(ref s) if s.contains("shared")),
        "{e}"
    );
    // raising the kernel attribute allows up to 227 KiB in total
    c.max_dynamic_shared_bytes = 232_448;
    c.dynamic_shared_bytes = 200_000;
    launch(m, &a, &g, "dyn_shared_reverse", &c, p()).unwrap();
    c.dynamic_shared_bytes = 232_449;
    c.max_dynamic_shared_bytes = 232_449;
    assert!(matches!(
        launch(m, &a, &g, "dyn_shared_reverse", &c, p()),
        Err(LaunchError::InvalidConfig(_))
    ));
    // static + dynamic over the default limit
    let mut c = cfg([1, 1, 1], [256, 1, 1]);
    c.dynamic_shared_bytes = 48 * 1024 - 1000;
    let e = m
        .launch(
            "reduce_sum",
            &c,
            &Params::new().ptr(dx).ptr(dy).i32(0).buf,
            &g,
            &a,
        )
        .unwrap_err();
    assert!(matches!(e, LaunchError::InvalidConfig(_)), "{e}");
}

#[test]
fn bad_kernel_name_and_param_size() {
    let (_, m) = corpus();
    let a = Arena::new(1 << 16);
    let g = place_globals(m, &a);
    let c = cfg([1, 1, 1], [32, 1, 1]);
    assert!(matches!(
        m.launch("nope", &c, &[], &g, &a),
        Err(LaunchError::NoSuchKernel(_))
    ));
    assert!(matches!(
        m.launch("saxpy", &c, &[0u8; 8], &g, &a),
        Err(LaunchError::ParamSize {
            expected: 24,
            got: 8
        })
    ));
}
