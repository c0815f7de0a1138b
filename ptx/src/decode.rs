//! Syntax tree -> decoded instructions. Everything that can be checked without launch values is checked here, so
//! a kernel that loads runs every instruction it contains or fails naming it.

use std::collections::HashMap;

use crate::float::Rnd;
use crate::ir::*;
use crate::parse::{AOp, AstFunc, AstModule, AstParam, AstVar, Lit, Stmt};
use crate::{GlobalSpace, GlobalVar, ParamInfo, PtxError};

pub(crate) struct Decoded {
    pub code: Vec<DInst>,
    pub funcs: Vec<Func>,
    pub globals: Vec<GlobalVar>,
    pub shared: Vec<SharedSym>,
    pub num_regs: u32,
}

/// Modifiers that do not change results in this interpreter (cache and eviction hints, memory-order semantics and
/// scopes: execution is sequentially consistent per block and atomics are real host atomics, which is at least as
/// strong as any PTX order).
const IGNORABLE: &[&str] = &[
    "uni",
    "ca",
    "cg",
    "cs",
    "lu",
    "cv",
    "wb",
    "wt",
    "nc",
    "volatile",
    "relaxed",
    "acquire",
    "release",
    "acq_rel",
    "weak",
    "sc",
    "cta",
    "gpu",
    "sys",
    "cluster",
    "aligned",
    "approx",
    "full",
    "sync",
    "L1::no_allocate",
    "L1::evict_last",
    "L1::evict_first",
    "L1::evict_normal",
    "L1::evict_unchanged",
    "L2::64B",
    "L2::128B",
    "L2::256B",
    "L2::evict_first",
    "L2::evict_last",
    "L2::evict_normal",
    "noftz",
    "shared::cta",
    "mmio",
];

struct Mods {
    parts: Vec<String>,
}

impl Mods {
    fn take(&mut self, m: &str) -> bool {
        if let Some(i) = self.parts.iter().position(|p| p == m) {
            self.parts.remove(i);
            true
        } else {
            false
        }
    }
    fn take_any(&mut self, ms: &[&str]) -> Option<String> {
        for m in ms {
            if self.take(m) {
                return Some(m.to_string());
            }
        }
        None
    }
    fn types(&mut self) -> Vec<Ty> {
        let mut out = Vec::new();
        self.parts.retain(|p| match Ty::parse(p) {
            Some(t) => {
                out.push(t);
                false
            }
            None => true,
        });
        out
    }
    fn rnd(&mut self) -> Option<Rnd> {
        self.take_any(&["rn", "rz", "rm", "rp"])
            .map(|r| match r.as_str() {
                "rz" => Rnd::Rz,
                "rm" => Rnd::Rm,
                "rp" => Rnd::Rp,
                _ => Rnd::Rn,
            })
    }
    fn space(&mut self) -> Space {
        match self
            .take_any(&[
                "global",
                "shared",
                "shared::cta",
                "local",
                "const",
                "param",
                "param::entry",
                "param::func",
            ])
            .as_deref()
        {
            Some("global") => Space::Global,
            Some("shared") | Some("shared::cta") => Space::Shared,
            Some("local") => Space::Local,
            Some("const") => Space::Const,
            Some("param") | Some("param::entry") | Some("param::func") => Space::Param,
            _ => Space::Generic,
        }
    }
    fn vec(&mut self) -> usize {
        if self.take("v2") {
            2
        } else if self.take("v4") {
            4
        } else if self.take("v8") {
            8
        } else {
            1
        }
    }
    /// Fails when modifiers are left that change meaning.
    fn finish(&self) -> Result<(), String> {
        for p in &self.parts {
            if !IGNORABLE.contains(&p.as_str()) {
                return Err(format!("modifier .{p}"));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Name {
    Reg(Reg),
    Sym(Sym),
    Label(u32),
    Func(u32),
}

struct FnCtx<'a> {
    scopes: Vec<HashMap<String, Name>>,
    module: &'a HashMap<String, Name>,
    labels: &'a HashMap<String, u32>,
}

impl FnCtx<'_> {
    fn lookup(&self, n: &str) -> Option<Name> {
        for s in self.scopes.iter().rev() {
            if let Some(v) = s.get(n) {
                return Some(*v);
            }
        }
        if let Some(&l) = self.labels.get(n) {
            return Some(Name::Label(l));
        }
        self.module.get(n).copied()
    }
}

fn sreg(name: &str) -> Option<Sreg> {
    let dim = |s: &str| match s {
        "x" => Some(0u8),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    if let Some((base, d)) = name.split_once('.') {
        let d = dim(d)?;
        return Some(match base {
            "%tid" => Sreg::Tid(d),
            "%ntid" => Sreg::Ntid(d),
            "%ctaid" => Sreg::Ctaid(d),
            "%nctaid" => Sreg::Nctaid(d),
            _ => return None,
        });
    }
    Some(match name {
        "%laneid" => Sreg::Laneid,
        "%warpid" => Sreg::Warpid,
        "%nwarpid" => Sreg::Nwarpid,
        "%clock" => Sreg::Clock,
        "%clock64" => Sreg::Clock64,
        "%globaltimer" => Sreg::Globaltimer,
        "%lanemask_eq" => Sreg::LanemaskEq,
        "%lanemask_lt" => Sreg::LanemaskLt,
        "%lanemask_le" => Sreg::LanemaskLe,
        "%lanemask_gt" => Sreg::LanemaskGt,
        "%lanemask_ge" => Sreg::LanemaskGe,
        "%smid" => Sreg::Smid,
        "%nsmid" => Sreg::Nsmid,
        "%dynamic_smem_size" => Sreg::DynSmem,
        "%total_smem_size" => Sreg::TotalSmem,
        _ => return None,
    })
}

fn lit_to_bits(l: Lit, ty: Option<Ty>) -> u64 {
    match (l, ty) {
        (Lit::Int(v), _) => v as u64,
        (Lit::F32(b), Some(Ty::F64)) => (f32::from_bits(b) as f64).to_bits(),
        (Lit::F32(b), _) => b as u64,
        (Lit::F64(b), Some(Ty::F32)) => (f64::from_bits(b) as f32).to_bits() as u64,
        (Lit::F64(b), _) => b,
        (Lit::Float(f), Some(Ty::F32)) => (f as f32).to_bits() as u64,
        (Lit::Float(f), _) => f.to_bits(),
    }
}

fn var_size(v: &AstVar) -> Result<(u64, u32, bool), String> {
    let ty =
        Ty::parse(v.ty.trim_start_matches('.')).ok_or_else(|| format!("unknown type {}", v.ty))?;
    let elem = ty.bytes() as u64 * v.vec as u64;
    let mut n = 1u64;
    let mut unsized_ = false;
    for d in &v.dims {
        match d {
            Some(d) => n *= d,
            None => unsized_ = true,
        }
    }
    let align = v.align.unwrap_or(elem as u32).max(1);
    Ok((elem * n, align, unsized_))
}

fn param_layout(p: &AstParam) -> Result<(u32, u32), String> {
    let ty = Ty::parse(p.ty.trim_start_matches('.'))
        .ok_or_else(|| format!("unknown param type {}", p.ty))?;
    let elem = ty.bytes();
    let size = elem * p.array.unwrap_or(1) as u32;
    let align = p.align.unwrap_or(elem).max(1);
    Ok((size, align))
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a.max(1)) * a.max(1)
}

pub(crate) fn decode(ast: &AstModule) -> Result<Decoded, PtxError> {
    let mut module: HashMap<String, Name> = HashMap::new();
    let mut globals = Vec::new();
    let mut shared = Vec::new();
    for v in &ast.vars {
        if matches!(v.ty.as_str(), ".texref" | ".samplerref" | ".surfref") {
            return Err(PtxError::Unsupported {
                kernel: String::new(),
                instruction: format!("{} {} (texture/surface references)", v.ty, v.name),
            });
        }
        let perr = |msg: String| PtxError::Parse { line: v.line, msg };
        let (size, align, unsized_) = var_size(v).map_err(perr)?;
        match v.space.as_str() {
            ".global" | ".const" => {
                if v.is_extern {
                    return Err(PtxError::Unsupported {
                        kernel: String::new(),
                        instruction: format!("extern {} variable {} (no linking)", v.space, v.name),
                    });
                }
                let mut init = vec![0u8; size as usize];
                if let Some(items) = &v.init {
                    let ty = Ty::parse(v.ty.trim_start_matches('.')).unwrap_or(Ty::B(8));
                    let es = ty.bytes() as usize;
                    for (i, it) in items.iter().enumerate() {
                        let bits = match it {
                            AOp::Imm(l) => lit_to_bits(*l, Some(ty)),
                            _ => {
                                return Err(PtxError::Unsupported {
                                    kernel: String::new(),
                                    instruction: format!(
                                        "initialiser of {} referring to a symbol (address initialisers)",
                                        v.name
                                    ),
                                })
                            }
                        };
                        let at = i * es;
                        if at + es > init.len() {
                            return Err(perr(format!("too many initialisers for {}", v.name)));
                        }
                        init[at..at + es].copy_from_slice(&bits.to_le_bytes()[..es]);
                    }
                }
                module.insert(v.name.clone(), Name::Sym(Sym::Global(globals.len() as u32)));
                globals.push(GlobalVar {
                    name: v.name.clone(),
                    space: if v.space == ".global" {
                        GlobalSpace::Global
                    } else {
                        GlobalSpace::Const
                    },
                    size,
                    align,
                    init,
                });
            }
            ".shared" => {
                module.insert(v.name.clone(), Name::Sym(Sym::Shared(shared.len() as u32)));
                shared.push(SharedSym {
                    size,
                    align,
                    dynamic: unsized_ || v.is_extern,
                    module_scope: true,
                });
            }
            ".local" => {
                return Err(PtxError::Unsupported {
                    kernel: String::new(),
                    instruction: format!("module-scope .local variable {}", v.name),
                })
            }
            s => return Err(perr(format!("unknown state space {s}"))),
        }
    }
    // Functions: one entry per distinct name (a prototype followed by a definition shares it).
    let mut funcs: Vec<Func> = Vec::new();
    let mut ast_of: Vec<Option<&AstFunc>> = Vec::new();
    for f in &ast.funcs {
        let idx = match module.get(&f.name) {
            Some(Name::Func(i)) => *i as usize,
            Some(_) => {
                return Err(PtxError::Parse {
                    line: f.line,
                    msg: format!("{} redefined", f.name),
                })
            }
            None => {
                module.insert(f.name.clone(), Name::Func(funcs.len() as u32));
                let perr = |msg: String| PtxError::Parse { line: f.line, msg };
                // frame: [params][rets] then body variables
                let mut off = 0u64;
                let mut param_offsets = Vec::new();
                let mut param_sizes = Vec::new();
                let mut kparams = Vec::new();
                for p in &f.params {
                    let (size, align) = param_layout(p).map_err(perr)?;
                    off = align_up(off, align as u64);
                    param_offsets.push(off as u32);
                    param_sizes.push(size);
                    kparams.push(ParamInfo {
                        offset: off as u32,
                        size,
                        align,
                    });
                    off += size as u64;
                }
                let mut ret_offset = None;
                for (i, p) in f.rets.iter().enumerate() {
                    if i > 0 {
                        return Err(PtxError::Unsupported {
                            kernel: f.name.clone(),
                            instruction: "function with several return values".into(),
                        });
                    }
                    let (size, align) = param_layout(p).map_err(perr)?;
                    off = align_up(off, align as u64);
                    ret_offset = Some((off as u32, size));
                    off += size as u64;
                }
                funcs.push(Func {
                    name: f.name.clone(),
                    is_entry: f.is_entry,
                    entry_pc: 0,
                    // kernel parameters live in the parameter buffer, not in the frame
                    frame_size: if f.is_entry { 0 } else { off as u32 },
                    param_offsets,
                    param_sizes,
                    ret_offset,
                    callees: Vec::new(),
                    shared_syms: Vec::new(),
                    recursive: false,
                    reg_range: (0, 0),
                    num_regs: 0,
                    maxntid: f.maxntid,
                    kparams,
                    has_body: false,
                });
                ast_of.push(None);
                funcs.len() - 1
            }
        };
        if f.body.is_some() {
            if ast_of[idx].is_some() {
                return Err(PtxError::Parse {
                    line: f.line,
                    msg: format!("{} defined twice", f.name),
                });
            }
            ast_of[idx] = Some(f);
        }
    }
    let mut code: Vec<DInst> = Vec::new();
    let mut nregs: u32 = 0;
    for fi in 0..funcs.len() {
        let Some(f) = ast_of[fi] else { continue };
        let body = f.body.as_ref().expect("checked above");
        let entry_pc = code.len() as u32;
        // labels: count instructions
        let mut labels = HashMap::new();
        let mut n = entry_pc;
        for s in body {
            match s {
                Stmt::Label(l) => {
                    labels.insert(l.clone(), n);
                }
                Stmt::Inst { .. } => n += 1,
                _ => {}
            }
        }
        let mut top = HashMap::new();
        for (i, p) in f.params.iter().enumerate() {
            let sym = if f.is_entry {
                Sym::KParam(funcs[fi].param_offsets[i])
            } else {
                Sym::Frame(funcs[fi].param_offsets[i])
            };
            top.insert(p.name.clone(), Name::Sym(sym));
        }
        if let (Some(r), Some((off, _))) = (f.rets.first(), funcs[fi].ret_offset) {
            top.insert(r.name.clone(), Name::Sym(Sym::Frame(off)));
        }
        let mut cx = FnCtx {
            scopes: vec![top],
            module: &module,
            labels: &labels,
        };
        let reg_start = nregs;
        let mut frame = funcs[fi].frame_size as u64;
        let mut callees = Vec::new();
        let mut shared_syms = Vec::new();
        for s in body {
            match s {
                Stmt::Open => cx.scopes.push(HashMap::new()),
                Stmt::Close => {
                    cx.scopes.pop();
                }
                Stmt::Label(_) => {}
                Stmt::Reg { ty, names } => {
                    let scope = cx.scopes.last_mut().expect("function scope");
                    let _ = ty;
                    for (name, cnt) in names {
                        match cnt {
                            Some(c) => {
                                for i in 0..*c {
                                    scope.insert(format!("{name}{i}"), Name::Reg(nregs));
                                    nregs += 1;
                                }
                            }
                            None => {
                                scope.insert(name.clone(), Name::Reg(nregs));
                                nregs += 1;
                            }
                        }
                    }
                }
                Stmt::Var(v) => {
                    let (size, align, unsized_) =
                        var_size(v).map_err(|msg| PtxError::Parse { line: v.line, msg })?;
                    let name = match v.space.as_str() {
                        ".local" | ".param" => {
                            frame = align_up(frame, align as u64);
                            let s = Sym::Frame(frame as u32);
                            frame += size;
                            Name::Sym(s)
                        }
                        ".shared" => {
                            let i = shared.len() as u32;
                            shared.push(SharedSym {
                                size,
                                align,
                                dynamic: unsized_ || v.is_extern,
                                module_scope: false,
                            });
                            shared_syms.push(i);
                            Name::Sym(Sym::Shared(i))
                        }
                        s => {
                            return Err(PtxError::Unsupported {
                                kernel: f.name.clone(),
                                instruction: format!("{s} variable {} inside a function", v.name),
                            })
                        }
                    };
                    cx.scopes
                        .last_mut()
                        .expect("scope")
                        .insert(v.name.clone(), name);
                }
                Stmt::Inst {
                    guard,
                    opcode,
                    ops,
                    line,
                } => {
                    let unsup = |what: String| PtxError::Unsupported {
                        kernel: f.name.clone(),
                        instruction: what,
                    };
                    let g = match guard {
                        None => None,
                        Some((p, neg)) => match cx.lookup(p) {
                            Some(Name::Reg(r)) => Some((r, *neg)),
                            _ => {
                                return Err(PtxError::Parse {
                                    line: *line,
                                    msg: format!("unknown guard predicate {p}"),
                                })
                            }
                        },
                    };
                    let inst = decode_inst(&cx, &funcs, fi, frame as u32, opcode, ops).map_err(
                        |e| match e {
                            DErr::Unsupported(m) => unsup(if m.is_empty() {
                                format!("{opcode} (line {line})")
                            } else {
                                format!("{opcode}: {m} (line {line})")
                            }),
                            DErr::Bad(m) => PtxError::Parse {
                                line: *line,
                                msg: format!("{opcode}: {m}"),
                            },
                        },
                    )?;
                    if let Inst::Call { func, .. } = &inst {
                        callees.push(*func);
                    }
                    code.push(DInst {
                        guard: g,
                        inst,
                        opcode: opcode.clone(),
                    });
                }
            }
        }
        let fr = &mut funcs[fi];
        fr.entry_pc = entry_pc;
        fr.frame_size = align_up(frame, 16) as u32;
        fr.callees = callees;
        fr.shared_syms = shared_syms;
        fr.reg_range = (reg_start, nregs);
        fr.num_regs = nregs - reg_start;
        fr.has_body = true;
    }
    // The caller's frame size in each Call was the size at that point; make it the final (aligned) size so callee
    // frames never overlap later-declared variables.
    for f in &funcs {
        if !f.has_body {
            continue;
        }
        let end = f.entry_pc as usize + count_insts(&ast_of, f);
        for di in &mut code[f.entry_pc as usize..end] {
            if let Inst::Call { caller_frame, .. } = &mut di.inst {
                *caller_frame = f.frame_size;
            }
        }
    }
    for i in 0..funcs.len() {
        if !funcs[i].has_body
            && (funcs[i].is_entry || funcs.iter().any(|f| f.callees.contains(&(i as u32))))
        {
            return Err(PtxError::Unsupported {
                kernel: funcs[i].name.clone(),
                instruction: "call of an external function without a body".into(),
            });
        }
    }
    // recursion: a function that reaches itself
    for i in 0..funcs.len() {
        let mut seen = vec![false; funcs.len()];
        let mut stack: Vec<u32> = funcs[i].callees.clone();
        while let Some(c) = stack.pop() {
            if c as usize == i {
                funcs[i].recursive = true;
                break;
            }
            if !seen[c as usize] {
                seen[c as usize] = true;
                stack.extend(funcs[c as usize].callees.iter().copied());
            }
        }
    }
    Ok(Decoded {
        code,
        funcs,
        globals,
        shared,
        num_regs: nregs,
    })
}

fn count_insts(ast_of: &[Option<&AstFunc>], f: &Func) -> usize {
    ast_of
        .iter()
        .flatten()
        .find(|a| a.name == f.name)
        .and_then(|a| a.body.as_ref())
        .map(|b| b.iter().filter(|s| matches!(s, Stmt::Inst { .. })).count())
        .unwrap_or(0)
}

enum DErr {
    Unsupported(String),
    Bad(String),
}

fn bad<T>(m: impl Into<String>) -> Result<T, DErr> {
    Err(DErr::Bad(m.into()))
}

fn src(cx: &FnCtx, o: &AOp, ty: Option<Ty>) -> Result<Op, DErr> {
    match o {
        AOp::Name { name, neg } => {
            if let Some(s) = sreg(name) {
                return Ok(Op::Sreg(s));
            }
            match cx.lookup(name) {
                Some(Name::Reg(r)) => Ok(if *neg { Op::NotPred(r) } else { Op::Reg(r) }),
                Some(_) => Err(DErr::Unsupported(format!(
                    "symbol {name} used as a value operand"
                ))),
                None => {
                    if name.starts_with('%') && sreg(name).is_none() && !name.contains('.') {
                        bad(format!("unknown register {name}"))
                    } else if name.starts_with('%') {
                        Err(DErr::Unsupported(format!("special register {name}")))
                    } else {
                        bad(format!("unknown name {name}"))
                    }
                }
            }
        }
        AOp::Imm(l) => Ok(Op::Imm(lit_to_bits(*l, ty))),
        _ => bad(format!("bad source operand {o:?}")),
    }
}

fn dst(cx: &FnCtx, o: &AOp) -> Result<Reg, DErr> {
    match o {
        AOp::Name { name, neg: false } => match cx.lookup(name) {
            Some(Name::Reg(r)) => Ok(r),
            _ => bad(format!("bad destination {name}")),
        },
        _ => bad(format!("bad destination {o:?}")),
    }
}

fn dst_opt(cx: &FnCtx, o: &AOp) -> Result<Option<Reg>, DErr> {
    if matches!(o, AOp::Sink) {
        Ok(None)
    } else {
        dst(cx, o).map(Some)
    }
}

fn addr(cx: &FnCtx, o: &AOp) -> Result<Addr, DErr> {
    match o {
        AOp::Addr { base: None, off } => Ok(Addr {
            base: AddrBase::Abs,
            off: *off,
        }),
        AOp::Addr { base: Some(b), off } => match cx.lookup(b) {
            Some(Name::Reg(r)) => Ok(Addr {
                base: AddrBase::Reg(r),
                off: *off,
            }),
            Some(Name::Sym(s)) => Ok(Addr {
                base: AddrBase::Sym(s),
                off: *off,
            }),
            _ => bad(format!("unknown address base {b}")),
        },
        _ => bad(format!("expected an address, found {o:?}")),
    }
}

fn need(ops: &[AOp], n: usize) -> Result<(), DErr> {
    if ops.len() != n {
        bad(format!("expected {n} operands, found {}", ops.len()))
    } else {
        Ok(())
    }
}

fn one_ty(m: &mut Mods) -> Result<Ty, DErr> {
    let t = m.types();
    if t.len() != 1 {
        return bad("expected one type");
    }
    Ok(t[0])
}

fn cmp_of(s: &str) -> Option<Cmp> {
    Some(match s {
        "eq" => Cmp::Eq,
        "ne" => Cmp::Ne,
        "lt" | "lo" => Cmp::Lt,
        "le" | "ls" => Cmp::Le,
        "gt" | "hi" => Cmp::Gt,
        "ge" | "hs" => Cmp::Ge,
        "equ" => Cmp::Equ,
        "neu" => Cmp::Neu,
        "ltu" => Cmp::Ltu,
        "leu" => Cmp::Leu,
        "gtu" => Cmp::Gtu,
        "geu" => Cmp::Geu,
        "num" => Cmp::Num,
        "nan" => Cmp::Nan,
        _ => return None,
    })
}

fn check_int(ty: Ty) -> Result<(), DErr> {
    if ty.is_float() || ty == Ty::Pred {
        Err(DErr::Unsupported(String::new()))
    } else {
        Ok(())
    }
}

fn check_f3264(ty: Ty) -> Result<(), DErr> {
    if matches!(ty, Ty::F32 | Ty::F64) {
        Ok(())
    } else {
        Err(DErr::Unsupported(String::new()))
    }
}

fn decode_inst(
    cx: &FnCtx,
    funcs: &[Func],
    fi: usize,
    frame_now: u32,
    opcode: &str,
    ops: &[AOp],
) -> Result<Inst, DErr> {
    let mut it = opcode.split('.');
    let base = it.next().unwrap_or("");
    let mut m = Mods {
        parts: it.map(str::to_string).collect(),
    };
    let unsup = || Err(DErr::Unsupported(String::new()));
    let inst = match base {
        "mov" => {
            let ty = one_ty(&mut m)?;
            need(ops, 2)?;
            match (&ops[0], &ops[1]) {
                (AOp::Vec(ds), a) => {
                    let part_bits = ty.bits() / ds.len() as u32;
                    let ds = ds
                        .iter()
                        .map(|d| dst_opt(cx, d))
                        .collect::<Result<Vec<_>, _>>()?;
                    Inst::Unpack {
                        ds,
                        a: src(cx, a, Some(ty))?,
                        part_bits,
                    }
                }
                (d, AOp::Vec(parts)) => {
                    let part_bits = ty.bits() / parts.len() as u32;
                    let parts = parts
                        .iter()
                        .map(|p| src(cx, p, None))
                        .collect::<Result<Vec<_>, _>>()?;
                    Inst::Pack {
                        d: dst(cx, d)?,
                        parts,
                        part_bits,
                    }
                }
                (d, AOp::Name { name, neg: false }) if sreg(name).is_none() => {
                    let d = dst(cx, d)?;
                    match cx.lookup(name) {
                        Some(Name::Reg(r)) => Inst::Mov {
                            d,
                            a: Op::Reg(r),
                            bits: ty.bits().max(1),
                        },
                        Some(Name::Sym(sym)) => Inst::MovSym { d, sym, off: 0 },
                        Some(Name::Func(_)) | Some(Name::Label(_)) => {
                            return Err(DErr::Unsupported("address of a function or label".into()))
                        }
                        None => return src(cx, &ops[1], None).map(|_| Inst::Nop),
                    }
                }
                (d, a) => Inst::Mov {
                    d: dst(cx, d)?,
                    a: src(cx, a, Some(ty))?,
                    bits: ty.bits().max(1),
                },
            }
        }
        "add" | "sub" | "mul" | "div" | "rem" | "min" | "max" | "and" | "or" | "xor" | "shl"
        | "shr" | "copysign" => {
            need(ops, 3)?;
            let ftz = m.take("ftz");
            let sat = m.take("sat");
            let rnd = m.rnd();
            let hi = m.take("hi");
            let lo = m.take("lo");
            let wide = m.take("wide");
            if m.take("relu") || m.take("NaN") || m.take("xorsign") || m.take("abs") {
                return unsup();
            }
            let ty = one_ty(&mut m)?;
            let d = dst(cx, &ops[0])?;
            let a = src(cx, &ops[1], Some(ty))?;
            let b = src(
                cx,
                &ops[2],
                if base == "shl" || base == "shr" {
                    None
                } else {
                    Some(ty)
                },
            )?;
            if ty == Ty::Pred {
                let op = match base {
                    "and" => BoolOp::And,
                    "or" => BoolOp::Or,
                    "xor" => BoolOp::Xor,
                    _ => return unsup(),
                };
                Inst::PredLogic { op, d, a, b }
            } else if ty.is_float() {
                check_f3264(ty)?;
                let op = match base {
                    "add" => FOp::Add,
                    "sub" => FOp::Sub,
                    "mul" => FOp::Mul,
                    "div" => FOp::Div,
                    "min" => FOp::Min,
                    "max" => FOp::Max,
                    "copysign" => FOp::Copysign,
                    _ => return unsup(),
                };
                if sat {
                    return Err(DErr::Unsupported(".sat on float arithmetic".into()));
                }
                if ty == Ty::F64 && rnd.is_some_and(|r| r != Rnd::Rn) && op == FOp::Div {
                    return Err(DErr::Unsupported(
                        "directed rounding of f64 division".into(),
                    ));
                }
                Inst::Float {
                    op,
                    ty,
                    rnd: rnd.unwrap_or(Rnd::Rn),
                    ftz,
                    d,
                    a,
                    b,
                }
            } else if wide {
                if base != "mul" || ty.bits() > 32 {
                    return unsup();
                }
                Inst::MulWide { ty, d, a, b }
            } else {
                let op = match (base, sat) {
                    ("add", false) => IntOp::Add,
                    ("add", true) if ty == Ty::S(32) => IntOp::AddSat,
                    ("sub", false) => IntOp::Sub,
                    ("sub", true) if ty == Ty::S(32) => IntOp::SubSat,
                    ("mul", false) if hi => IntOp::MulHi,
                    ("mul", false) => IntOp::MulLo,
                    ("div", false) => IntOp::Div,
                    ("rem", false) => IntOp::Rem,
                    ("min", false) => IntOp::Min,
                    ("max", false) => IntOp::Max,
                    ("and", false) => IntOp::And,
                    ("or", false) => IntOp::Or,
                    ("xor", false) => IntOp::Xor,
                    ("shl", false) => IntOp::Shl,
                    ("shr", false) => IntOp::Shr,
                    _ => return unsup(),
                };
                let _ = lo;
                if rnd.is_some() || ftz {
                    return bad("rounding on an integer op");
                }
                Inst::Int { op, ty, d, a, b }
            }
        }
        "mad" | "fma" => {
            need(ops, 4)?;
            let ftz = m.take("ftz");
            let sat = m.take("sat");
            let rnd = m.rnd();
            let mode = if m.take("hi") {
                MadMode::Hi
            } else if m.take("wide") {
                MadMode::Wide
            } else {
                m.take("lo");
                MadMode::Lo
            };
            let ty = one_ty(&mut m)?;
            let d = dst(cx, &ops[0])?;
            let cty = if mode == MadMode::Wide {
                Some(match ty {
                    Ty::U(b) => Ty::U(b * 2),
                    Ty::S(b) => Ty::S(b * 2),
                    t => t,
                })
            } else {
                Some(ty)
            };
            let (a, b, c) = (
                src(cx, &ops[1], Some(ty))?,
                src(cx, &ops[2], Some(ty))?,
                src(cx, &ops[3], cty)?,
            );
            if ty.is_float() {
                check_f3264(ty)?;
                let rnd = rnd.unwrap_or(Rnd::Rn);
                if ty == Ty::F64 && rnd != Rnd::Rn {
                    return Err(DErr::Unsupported("directed rounding of f64 fma".into()));
                }
                Inst::Fma {
                    ty,
                    rnd,
                    ftz,
                    sat,
                    d,
                    a,
                    b,
                    c,
                }
            } else {
                check_int(ty)?;
                if sat && !(mode == MadMode::Hi && ty == Ty::S(32)) {
                    return unsup();
                }
                if mode == MadMode::Wide && ty.bits() > 32 {
                    return unsup();
                }
                Inst::Mad {
                    mode,
                    sat,
                    ty,
                    d,
                    a,
                    b,
                    c,
                }
            }
        }
        "neg" | "abs" | "not" | "cnot" | "popc" | "clz" | "brev" | "rcp" | "sqrt" | "rsqrt"
        | "ex2" | "lg2" | "sin" | "cos" | "tanh" => {
            need(ops, 2)?;
            let ftz = m.take("ftz");
            let rnd = m.rnd();
            let ty = one_ty(&mut m)?;
            let d = dst(cx, &ops[0])?;
            let a = src(cx, &ops[1], Some(ty))?;
            if ty == Ty::Pred {
                if base != "not" {
                    return unsup();
                }
                return finish(
                    &m,
                    Inst::PredLogic {
                        op: BoolOp::Xor,
                        d,
                        a,
                        b: Op::Imm(1),
                    },
                );
            }
            let op = match (base, ty.is_float()) {
                ("neg", false) => UOp::Neg,
                ("abs", false) => UOp::Abs,
                ("not", false) => UOp::Not,
                ("cnot", false) => UOp::Cnot,
                ("popc", false) => UOp::Popc,
                ("clz", false) => UOp::Clz,
                ("brev", false) => UOp::Brev,
                ("neg", true) => UOp::FNeg,
                ("abs", true) => UOp::FAbs,
                ("rcp", true) => UOp::Rcp,
                ("sqrt", true) => UOp::Sqrt,
                ("rsqrt", true) => UOp::Rsqrt,
                ("ex2", true) => UOp::Ex2,
                ("lg2", true) => UOp::Lg2,
                ("sin", true) => UOp::Sin,
                ("cos", true) => UOp::Cos,
                ("tanh", true) => UOp::Tanh,
                _ => return unsup(),
            };
            if ty.is_float() {
                check_f3264(ty)?;
            }
            let rnd = rnd.unwrap_or(Rnd::Rn);
            if rnd != Rnd::Rn && matches!(op, UOp::Rcp | UOp::Sqrt) && ty == Ty::F64 {
                return Err(DErr::Unsupported(
                    "directed rounding of f64 rcp/sqrt".into(),
                ));
            }
            Inst::Unary {
                op,
                ty,
                ftz,
                rnd,
                d,
                a,
            }
        }
        "bfe" => {
            need(ops, 4)?;
            let ty = one_ty(&mut m)?;
            check_int(ty)?;
            Inst::Bfe {
                ty,
                d: dst(cx, &ops[0])?,
                a: src(cx, &ops[1], Some(ty))?,
                b: src(cx, &ops[2], None)?,
                c: src(cx, &ops[3], None)?,
            }
        }
        "bfi" => {
            need(ops, 5)?;
            let ty = one_ty(&mut m)?;
            check_int(ty)?;
            Inst::Bfi {
                ty,
                d: dst(cx, &ops[0])?,
                f: src(cx, &ops[1], Some(ty))?,
                a: src(cx, &ops[2], Some(ty))?,
                b: src(cx, &ops[3], None)?,
                c: src(cx, &ops[4], None)?,
            }
        }
        "prmt" => {
            need(ops, 4)?;
            let ty = one_ty(&mut m)?;
            if ty != Ty::B(32) || !m.parts.is_empty() {
                return Err(DErr::Unsupported(
                    "prmt modes other than the default".into(),
                ));
            }
            Inst::Prmt {
                d: dst(cx, &ops[0])?,
                a: src(cx, &ops[1], None)?,
                b: src(cx, &ops[2], None)?,
                c: src(cx, &ops[3], None)?,
            }
        }
        "shf" => {
            need(ops, 4)?;
            let left = if m.take("l") {
                true
            } else if m.take("r") {
                false
            } else {
                return bad("shf needs .l or .r");
            };
            let clamp = if m.take("clamp") {
                true
            } else {
                m.take("wrap");
                false
            };
            let ty = one_ty(&mut m)?;
            if ty.bits() != 32 {
                return unsup();
            }
            Inst::Shf {
                left,
                clamp,
                d: dst(cx, &ops[0])?,
                a: src(cx, &ops[1], None)?,
                b: src(cx, &ops[2], None)?,
                c: src(cx, &ops[3], None)?,
            }
        }
        "setp" => {
            let cmp = m
                .parts
                .first()
                .and_then(|c| cmp_of(c))
                .ok_or_else(|| DErr::Bad("setp needs a comparison".into()))?;
            m.parts.remove(0);
            let comb = m.take_any(&["and", "or", "xor"]).map(|c| match c.as_str() {
                "and" => BoolOp::And,
                "or" => BoolOp::Or,
                _ => BoolOp::Xor,
            });
            m.take("ftz");
            let ty = one_ty(&mut m)?;
            if matches!(ty, Ty::F16 | Ty::BF16) {
                return unsup();
            }
            let n = if comb.is_some() { 4 } else { 3 };
            need(ops, n)?;
            let (d, d2) = match &ops[0] {
                AOp::Pair(p, q) => (
                    dst(
                        cx,
                        &AOp::Name {
                            name: p.clone(),
                            neg: false,
                        },
                    )?,
                    Some(dst(
                        cx,
                        &AOp::Name {
                            name: q.clone(),
                            neg: false,
                        },
                    )?),
                ),
                o => (dst(cx, o)?, None),
            };
            Inst::Setp {
                cmp,
                ty,
                d,
                d2,
                a: src(cx, &ops[1], Some(ty))?,
                b: src(cx, &ops[2], Some(ty))?,
                comb: match comb {
                    Some(c) => Some((c, src(cx, &ops[3], None)?)),
                    None => None,
                },
            }
        }
        "selp" => {
            need(ops, 4)?;
            let ty = one_ty(&mut m)?;
            Inst::Selp {
                d: dst(cx, &ops[0])?,
                a: src(cx, &ops[1], Some(ty))?,
                b: src(cx, &ops[2], Some(ty))?,
                c: src(cx, &ops[3], None)?,
            }
        }
        "slct" => {
            need(ops, 4)?;
            m.take("ftz");
            let t = m.types();
            if t.len() != 2 || !matches!(t[1], Ty::S(32) | Ty::F32) {
                return bad("slct needs .dtype.s32 or .dtype.f32");
            }
            Inst::Slct {
                cty: t[1],
                d: dst(cx, &ops[0])?,
                a: src(cx, &ops[1], Some(t[0]))?,
                b: src(cx, &ops[2], Some(t[0]))?,
                c: src(cx, &ops[3], Some(t[1]))?,
            }
        }
        "cvt" => {
            need(ops, 2)?;
            let ftz = m.take("ftz");
            let sat = m.take("sat");
            let rnd = m
                .take_any(&["rn", "rz", "rm", "rp", "rni", "rzi", "rmi", "rpi"])
                .map(|r| match r.as_str() {
                    "rn" => CvtRnd::F(Rnd::Rn),
                    "rz" => CvtRnd::F(Rnd::Rz),
                    "rm" => CvtRnd::F(Rnd::Rm),
                    "rp" => CvtRnd::F(Rnd::Rp),
                    "rni" => CvtRnd::I(Rnd::Rn),
                    "rzi" => CvtRnd::I(Rnd::Rz),
                    "rmi" => CvtRnd::I(Rnd::Rm),
                    _ => CvtRnd::I(Rnd::Rp),
                });
            if m.take("relu") || m.take("satfinite") {
                return unsup();
            }
            let t = m.types();
            if t.len() != 2 || t.contains(&Ty::Pred) {
                return unsup();
            }
            Inst::Cvt {
                dt: t[0],
                st: t[1],
                rnd,
                sat,
                ftz,
                d: dst(cx, &ops[0])?,
                a: src(cx, &ops[1], Some(t[1]))?,
            }
        }
        "cvta" => {
            need(ops, 2)?;
            let to = m.take("to");
            let space = m.space();
            if matches!(space, Space::Generic) {
                return bad("cvta needs a state space");
            }
            let ty = one_ty(&mut m)?;
            let d = dst(cx, &ops[0])?;
            if let AOp::Name { name, .. } = &ops[1] {
                if let Some(Name::Sym(sym)) = cx.lookup(name) {
                    // cvta.global.u64 %rd, sym: address of the symbol, then convert
                    let _ = ty;
                    return finish(&m, Inst::MovSym { d, sym, off: 0 });
                }
            }
            Inst::Cvta {
                to,
                space,
                d,
                a: src(cx, &ops[1], None)?,
            }
        }
        "testp" => {
            need(ops, 2)?;
            let what = m
                .take_any(&[
                    "finite",
                    "infinite",
                    "number",
                    "notanumber",
                    "normal",
                    "subnormal",
                ])
                .ok_or_else(|| DErr::Bad("testp needs a test".into()))?;
            let ty = one_ty(&mut m)?;
            check_f3264(ty)?;
            Inst::Testp {
                finite: match what.as_str() {
                    "finite" => 0,
                    "infinite" => 1,
                    "number" => 2,
                    "notanumber" => 3,
                    "normal" => 4,
                    _ => 5,
                },
                ty,
                d: dst(cx, &ops[0])?,
                a: src(cx, &ops[1], Some(ty))?,
            }
        }
        "ld" | "ldu" | "st" => {
            need(ops, 2)?;
            let space = m.space();
            if m.take("L2::cache_hint")
                || m.parts
                    .iter()
                    .any(|p| p.starts_with("L2::prefetch") || p == "unified")
            {
                m.parts.retain(|p| !p.starts_with("L2::prefetch"));
                if m.take("unified") {
                    return unsup();
                }
            }
            let n = m.vec();
            let ty = one_ty(&mut m)?;
            if ty == Ty::Pred || n == 8 {
                return unsup();
            }
            if base == "st" {
                let a = addr(cx, &ops[0])?;
                let vals = match &ops[1] {
                    AOp::Vec(v) => v
                        .iter()
                        .map(|o| src(cx, o, Some(ty)))
                        .collect::<Result<Vec<_>, _>>()?,
                    o => vec![src(cx, o, Some(ty))?],
                };
                if vals.len() != n {
                    return bad("vector width mismatch");
                }
                Inst::St {
                    space,
                    ty,
                    vals,
                    addr: a,
                }
            } else {
                let a = addr(cx, &ops[1])?;
                let ds = match &ops[0] {
                    AOp::Vec(v) => v
                        .iter()
                        .map(|o| dst_opt(cx, o))
                        .collect::<Result<Vec<_>, _>>()?,
                    o => vec![Some(dst(cx, o)?)],
                };
                if ds.len() != n {
                    return bad("vector width mismatch");
                }
                Inst::Ld {
                    space,
                    ty,
                    ds,
                    addr: a,
                }
            }
        }
        "atom" | "red" => {
            let space = m.space();
            if !matches!(space, Space::Global | Space::Shared | Space::Generic) {
                return unsup();
            }
            let opname = m
                .take_any(&[
                    "add", "min", "max", "inc", "dec", "and", "or", "xor", "exch", "cas",
                ])
                .ok_or_else(|| DErr::Unsupported("atomic operation".into()))?;
            m.take("noftz");
            if m.vec() != 1 {
                return unsup();
            }
            let ty = one_ty(&mut m)?;
            let op = match opname.as_str() {
                "add" if matches!(ty, Ty::F32 | Ty::F64) => AtomOp::FAdd,
                "add" if !ty.is_float() => AtomOp::Add,
                "min" if !ty.is_float() => AtomOp::Min,
                "max" if !ty.is_float() => AtomOp::Max,
                "inc" if ty.bits() == 32 => AtomOp::Inc,
                "dec" if ty.bits() == 32 => AtomOp::Dec,
                "and" => AtomOp::And,
                "or" => AtomOp::Or,
                "xor" => AtomOp::Xor,
                "exch" => AtomOp::Exch,
                "cas" => AtomOp::Cas,
                _ => return unsup(),
            };
            if !matches!(ty.bits(), 32 | 64) {
                return unsup();
            }
            let has_d = base == "atom";
            let nsrc = if op == AtomOp::Cas { 2 } else { 1 };
            need(ops, nsrc + 1 + has_d as usize)?;
            let k = has_d as usize;
            Inst::Atom {
                space,
                op,
                ty,
                d: if has_d { Some(dst(cx, &ops[0])?) } else { None },
                addr: addr(cx, &ops[k])?,
                b: src(cx, &ops[k + 1], Some(ty))?,
                c: if op == AtomOp::Cas {
                    Some(src(cx, &ops[k + 2], Some(ty))?)
                } else {
                    None
                },
            }
        }
        "bra" | "brx" => {
            if base == "brx" {
                return unsup();
            }
            need(ops, 1)?;
            match &ops[0] {
                AOp::Name { name, .. } => match cx.lookup(name) {
                    Some(Name::Label(t)) => Inst::Bra { target: t },
                    _ => return bad(format!("unknown label {name}")),
                },
                _ => return bad("bra needs a label"),
            }
        }
        "call" => {
            let mut i = 0;
            let mut ret_sym = None;
            if let Some(AOp::List(r)) = ops.first() {
                if r.len() > 1 {
                    return Err(DErr::Unsupported("several return values".into()));
                }
                ret_sym = r.first().cloned();
                i = 1;
            }
            let fname = match ops.get(i) {
                Some(AOp::Name { name, .. }) => name.clone(),
                _ => return bad("call needs a function name"),
            };
            let func = match cx.lookup(&fname) {
                Some(Name::Func(f)) => f,
                Some(Name::Reg(_)) => return Err(DErr::Unsupported("indirect call".into())),
                _ => return bad(format!("unknown function {fname}")),
            };
            if ops.len() > i + 2 {
                return Err(DErr::Unsupported("call with a prototype (indirect)".into()));
            }
            let callee = &funcs[func as usize];
            let frame_off = |o: &AOp| -> Result<u32, DErr> {
                match o {
                    AOp::Name { name, .. } => match cx.lookup(name) {
                        Some(Name::Sym(Sym::Frame(off))) => Ok(off),
                        _ => Err(DErr::Unsupported(format!(
                            "call argument {name} is not a .param variable"
                        ))),
                    },
                    _ => Err(DErr::Unsupported(
                        "call argument that is not a .param variable".into(),
                    )),
                }
            };
            let mut args = Vec::new();
            if let Some(AOp::List(a)) = ops.get(i + 1) {
                if a.len() != callee.param_offsets.len() {
                    return bad(format!(
                        "{fname} takes {} arguments",
                        callee.param_offsets.len()
                    ));
                }
                for (k, o) in a.iter().enumerate() {
                    args.push(FrameCopy {
                        from: frame_off(o)?,
                        to: callee.param_offsets[k],
                        size: callee.param_sizes[k],
                    });
                }
            } else if !callee.param_offsets.is_empty() {
                return bad(format!("{fname} takes arguments"));
            }
            let ret = match (ret_sym, callee.ret_offset) {
                (Some(r), Some((off, size))) => Some(FrameCopy {
                    from: off,
                    to: frame_off(&r)?,
                    size,
                }),
                (None, _) => None,
                (Some(_), None) => return bad(format!("{fname} returns nothing")),
            };
            let _ = (fi, frame_now);
            m.take("uni");
            Inst::Call {
                func,
                caller_frame: 0,
                args,
                ret,
            }
        }
        "ret" => Inst::Ret,
        "exit" => Inst::Exit,
        "trap" => Inst::Trap,
        "bar" | "barrier" => {
            // bar.sync / bar.arrive / bar.red / barrier.sync / bar.warp.sync
            if m.take("warp") {
                m.take("sync");
                need(ops, 1)?;
                return finish(
                    &m,
                    Inst::WarpSync {
                        mask: src(cx, &ops[0], None)?,
                    },
                );
            }
            m.take("cta");
            let arrive = m.take("arrive");
            let red = m.take("red");
            if !arrive && !red && !m.take("sync") {
                return unsup();
            }
            m.take("aligned");
            if red {
                let rop = match m.take_any(&["popc", "and", "or"]).as_deref() {
                    Some("popc") => ReduxOp::Add,
                    Some("and") => ReduxOp::And,
                    Some("or") => ReduxOp::Or,
                    _ => return bad("bar.red needs popc/and/or"),
                };
                let ty = one_ty(&mut m)?;
                let _ = ty;
                // bar.red.op.ty d, a{, b}, {!}c
                let (id, count, p) = match ops.len() {
                    3 => (src(cx, &ops[1], None)?, None, src(cx, &ops[2], None)?),
                    4 => (
                        src(cx, &ops[1], None)?,
                        Some(src(cx, &ops[2], None)?),
                        src(cx, &ops[3], None)?,
                    ),
                    _ => return bad("bar.red operands"),
                };
                Inst::Bar {
                    id,
                    count,
                    wait: true,
                    red: Some((rop, dst(cx, &ops[0])?, p)),
                }
            } else {
                if ops.is_empty() || ops.len() > 2 {
                    return bad("bar operands");
                }
                Inst::Bar {
                    id: src(cx, &ops[0], None)?,
                    count: match ops.get(1) {
                        Some(o) => Some(src(cx, o, None)?),
                        None => None,
                    },
                    wait: !arrive,
                    red: None,
                }
            }
        }
        "membar" | "fence" => {
            if m.parts
                .iter()
                .any(|p| p.starts_with("proxy") || p.starts_with("mbarrier"))
            {
                return unsup();
            }
            m.take_any(&["cta", "gl", "sys", "gpu", "sc", "acq_rel", "cluster"]);
            m.parts.clear();
            Inst::Fence
        }
        "shfl" => {
            m.take("sync");
            let mode = match m.take_any(&["up", "down", "bfly", "idx"]).as_deref() {
                Some("up") => ShflMode::Up,
                Some("down") => ShflMode::Down,
                Some("bfly") => ShflMode::Bfly,
                Some("idx") => ShflMode::Idx,
                _ => return bad("shfl mode"),
            };
            let ty = one_ty(&mut m)?;
            if ty.bits() != 32 {
                return unsup();
            }
            if ops.len() != 5 {
                return Err(DErr::Unsupported("shfl without .sync member mask".into()));
            }
            let (d, pd) = match &ops[0] {
                AOp::Pair(a, b) => (
                    dst(
                        cx,
                        &AOp::Name {
                            name: a.clone(),
                            neg: false,
                        },
                    )?,
                    Some(dst(
                        cx,
                        &AOp::Name {
                            name: b.clone(),
                            neg: false,
                        },
                    )?),
                ),
                o => (dst(cx, o)?, None),
            };
            Inst::Shfl {
                mode,
                d,
                pd,
                a: src(cx, &ops[1], None)?,
                b: src(cx, &ops[2], None)?,
                c: src(cx, &ops[3], None)?,
                mask: src(cx, &ops[4], None)?,
            }
        }
        "vote" => {
            if !m.take("sync") {
                return Err(DErr::Unsupported("vote without .sync".into()));
            }
            let mode = match m.take_any(&["all", "any", "uni", "ballot"]).as_deref() {
                Some("all") => VoteMode::All,
                Some("any") => VoteMode::Any,
                Some("uni") => VoteMode::Uni,
                Some("ballot") => VoteMode::Ballot,
                _ => return bad("vote mode"),
            };
            let _ = m.types();
            need(ops, 3)?;
            Inst::Vote {
                mode,
                d: dst(cx, &ops[0])?,
                a: src(cx, &ops[1], None)?,
                mask: src(cx, &ops[2], None)?,
            }
        }
        "activemask" => {
            let _ = m.types();
            need(ops, 1)?;
            Inst::Activemask {
                d: dst(cx, &ops[0])?,
            }
        }
        "match" => {
            let all = match m.take_any(&["any", "all"]).as_deref() {
                Some("all") => true,
                Some("any") => false,
                _ => return bad("match mode"),
            };
            m.take("sync");
            let ty = one_ty(&mut m)?;
            need(ops, 3)?;
            let (d, pd) = match &ops[0] {
                AOp::Pair(a, b) => (
                    dst(
                        cx,
                        &AOp::Name {
                            name: a.clone(),
                            neg: false,
                        },
                    )?,
                    Some(dst(
                        cx,
                        &AOp::Name {
                            name: b.clone(),
                            neg: false,
                        },
                    )?),
                ),
                o => (dst(cx, o)?, None),
            };
            Inst::Match {
                all,
                bits: ty.bits(),
                d,
                pd,
                a: src(cx, &ops[1], None)?,
                mask: src(cx, &ops[2], None)?,
            }
        }
        "redux" => {
            m.take("sync");
            let op = match m
                .take_any(&["add", "min", "max", "and", "or", "xor"])
                .as_deref()
            {
                Some("add") => ReduxOp::Add,
                Some("min") => ReduxOp::Min,
                Some("max") => ReduxOp::Max,
                Some("and") => ReduxOp::And,
                Some("or") => ReduxOp::Or,
                Some("xor") => ReduxOp::Xor,
                _ => return bad("redux op"),
            };
            let ty = one_ty(&mut m)?;
            if ty.is_float() || ty.bits() != 32 {
                return unsup();
            }
            need(ops, 3)?;
            Inst::Redux {
                op,
                ty,
                d: dst(cx, &ops[0])?,
                a: src(cx, &ops[1], None)?,
                mask: src(cx, &ops[2], None)?,
            }
        }
        "nanosleep" | "pmevent" => {
            m.parts.clear();
            Inst::Nop
        }
        "prefetch" | "prefetchu" | "discard" | "applypriority" | "createpolicy" => return unsup(),
        _ => return unsup(),
    };
    finish(&m, inst)
}

fn finish(m: &Mods, inst: Inst) -> Result<Inst, DErr> {
    m.finish().map_err(DErr::Unsupported)?;
    Ok(inst)
}
