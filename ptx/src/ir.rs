//! The decoded form a launch executes: registers are indices into a warp's register file, symbols are resolved to
//! frame offsets / global indices / shared-symbol indices, labels to instruction indices.

use crate::float::Rnd;

pub(crate) type Reg = u32;

/// Scalar type of an instruction (the `.u32` in `add.u32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ty {
    B(u32),
    U(u32),
    S(u32),
    F16,
    BF16,
    F32,
    F64,
    Pred,
}

impl Ty {
    pub(crate) fn parse(s: &str) -> Option<Ty> {
        Some(match s {
            "b8" => Ty::B(8),
            "b16" => Ty::B(16),
            "b32" => Ty::B(32),
            "b64" => Ty::B(64),
            "u8" => Ty::U(8),
            "u16" => Ty::U(16),
            "u32" => Ty::U(32),
            "u64" => Ty::U(64),
            "s8" => Ty::S(8),
            "s16" => Ty::S(16),
            "s32" => Ty::S(32),
            "s64" => Ty::S(64),
            "f16" => Ty::F16,
            "bf16" => Ty::BF16,
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "pred" => Ty::Pred,
            _ => return None,
        })
    }
    pub(crate) fn bits(self) -> u32 {
        match self {
            Ty::B(b) | Ty::U(b) | Ty::S(b) => b,
            Ty::F16 | Ty::BF16 => 16,
            Ty::F32 => 32,
            Ty::F64 => 64,
            Ty::Pred => 1,
        }
    }
    pub(crate) fn bytes(self) -> u32 {
        self.bits().div_ceil(8)
    }
    pub(crate) fn is_float(self) -> bool {
        matches!(self, Ty::F16 | Ty::BF16 | Ty::F32 | Ty::F64)
    }
    pub(crate) fn is_signed(self) -> bool {
        matches!(self, Ty::S(_))
    }
}

/// Special registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sreg {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    Laneid,
    Warpid,
    Nwarpid,
    Clock,
    Clock64,
    Globaltimer,
    LanemaskEq,
    LanemaskLt,
    LanemaskLe,
    LanemaskGt,
    LanemaskGe,
    Smid,
    Nsmid,
    DynSmem,
    TotalSmem,
}

/// A source operand.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Reg(Reg),
    /// A predicate register read negated (`!%p`).
    NotPred(Reg),
    Imm(u64),
    Sreg(Sreg),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Space {
    Global,
    Shared,
    Local,
    Const,
    Param,
    Generic,
}

/// The address of a variable, as `mov %rd, sym` produces it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Sym {
    /// Module `.global`/`.const` variable: index into `Module::globals`.
    Global(u32),
    /// Static or dynamic shared variable: index into the module's shared-symbol table.
    Shared(u32),
    /// Offset in the current function's local frame (`.local` arrays, `.param` of a `.func` or a call sequence).
    Frame(u32),
    /// Offset in the kernel parameter buffer.
    KParam(u32),
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum AddrBase {
    Reg(Reg),
    Abs,
    Sym(Sym),
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Addr {
    pub base: AddrBase,
    pub off: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IntOp {
    Add,
    AddSat,
    Sub,
    SubSat,
    MulLo,
    MulHi,
    Div,
    Rem,
    Min,
    Max,
    And,
    Or,
    Xor,
    Shl,
    Shr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FOp {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
    Copysign,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UOp {
    Not,
    Cnot,
    Neg,
    Abs,
    Popc,
    Clz,
    Brev,
    FNeg,
    FAbs,
    Rcp,
    Sqrt,
    Rsqrt,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Tanh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BoolOp {
    And,
    Or,
    Xor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AtomOp {
    Add,
    FAdd,
    Min,
    Max,
    Inc,
    Dec,
    And,
    Or,
    Xor,
    Exch,
    Cas,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VoteMode {
    All,
    Any,
    Uni,
    Ballot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReduxOp {
    Add,
    Min,
    Max,
    And,
    Or,
    Xor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MadMode {
    Lo,
    Hi,
    Wide,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CvtRnd {
    /// Float rounding (.rn .rz .rm .rp)
    F(Rnd),
    /// Round to integer (.rni .rzi .rmi .rpi)
    I(Rnd),
}

/// A copy between the caller's and callee's frames at `call`/`ret`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameCopy {
    pub from: u32,
    pub to: u32,
    pub size: u32,
}

#[derive(Clone, Debug)]
pub(crate) enum Inst {
    Mov {
        d: Reg,
        a: Op,
        bits: u32,
    },
    MovSym {
        d: Reg,
        sym: Sym,
        off: i64,
    },
    /// `mov.b64 %rd, {%r1, %r2}`: parts from least significant.
    Pack {
        d: Reg,
        parts: Vec<Op>,
        part_bits: u32,
    },
    Unpack {
        ds: Vec<Option<Reg>>,
        a: Op,
        part_bits: u32,
    },
    Int {
        op: IntOp,
        ty: Ty,
        d: Reg,
        a: Op,
        b: Op,
    },
    MulWide {
        ty: Ty,
        d: Reg,
        a: Op,
        b: Op,
    },
    Mad {
        mode: MadMode,
        sat: bool,
        ty: Ty,
        d: Reg,
        a: Op,
        b: Op,
        c: Op,
    },
    Float {
        op: FOp,
        ty: Ty,
        rnd: Rnd,
        ftz: bool,
        d: Reg,
        a: Op,
        b: Op,
    },
    Fma {
        ty: Ty,
        rnd: Rnd,
        ftz: bool,
        sat: bool,
        d: Reg,
        a: Op,
        b: Op,
        c: Op,
    },
    Unary {
        op: UOp,
        ty: Ty,
        ftz: bool,
        rnd: Rnd,
        d: Reg,
        a: Op,
    },
    Bfe {
        ty: Ty,
        d: Reg,
        a: Op,
        b: Op,
        c: Op,
    },
    Bfi {
        ty: Ty,
        d: Reg,
        f: Op,
        a: Op,
        b: Op,
        c: Op,
    },
    Prmt {
        d: Reg,
        a: Op,
        b: Op,
        c: Op,
    },
    /// Funnel shift: `shf.{l,r}.{wrap,clamp}.b32`
    Shf {
        left: bool,
        clamp: bool,
        d: Reg,
        a: Op,
        b: Op,
        c: Op,
    },
    Setp {
        cmp: Cmp,
        ty: Ty,
        d: Reg,
        d2: Option<Reg>,
        a: Op,
        b: Op,
        comb: Option<(BoolOp, Op)>,
    },
    PredLogic {
        op: BoolOp,
        d: Reg,
        a: Op,
        b: Op,
    },
    Selp {
        d: Reg,
        a: Op,
        b: Op,
        c: Op,
    },
    Slct {
        cty: Ty,
        d: Reg,
        a: Op,
        b: Op,
        c: Op,
    },
    Cvt {
        dt: Ty,
        st: Ty,
        rnd: Option<CvtRnd>,
        sat: bool,
        ftz: bool,
        d: Reg,
        a: Op,
    },
    Cvta {
        to: bool,
        space: Space,
        d: Reg,
        a: Op,
    },
    Testp {
        finite: u8,
        ty: Ty,
        d: Reg,
        a: Op,
    },
    Ld {
        space: Space,
        ty: Ty,
        ds: Vec<Option<Reg>>,
        addr: Addr,
    },
    St {
        space: Space,
        ty: Ty,
        vals: Vec<Op>,
        addr: Addr,
    },
    Atom {
        space: Space,
        op: AtomOp,
        ty: Ty,
        d: Option<Reg>,
        addr: Addr,
        b: Op,
        c: Option<Op>,
    },
    Bra {
        target: u32,
    },
    Call {
        func: u32,
        caller_frame: u32,
        args: Vec<FrameCopy>,
        ret: Option<FrameCopy>,
    },
    Ret,
    Exit,
    Trap,
    /// bar.sync / barrier.sync / bar.arrive / bar.red
    Bar {
        id: Op,
        count: Option<Op>,
        wait: bool,
        red: Option<(ReduxOp, Reg, Op)>,
    },
    WarpSync {
        mask: Op,
    },
    Fence,
    Shfl {
        mode: ShflMode,
        d: Reg,
        pd: Option<Reg>,
        a: Op,
        b: Op,
        c: Op,
        mask: Op,
    },
    Vote {
        mode: VoteMode,
        d: Reg,
        a: Op,
        mask: Op,
    },
    Activemask {
        d: Reg,
    },
    Match {
        all: bool,
        bits: u32,
        d: Reg,
        pd: Option<Reg>,
        a: Op,
        mask: Op,
    },
    Redux {
        op: ReduxOp,
        ty: Ty,
        d: Reg,
        a: Op,
        mask: Op,
    },
    Nop,
}

impl Inst {
    /// Warp-synchronous instructions: every lane of the member mask must arrive before any executes.
    pub(crate) fn sync_mask(&self) -> Option<Op> {
        match self {
            Inst::WarpSync { mask }
            | Inst::Shfl { mask, .. }
            | Inst::Vote { mask, .. }
            | Inst::Match { mask, .. }
            | Inst::Redux { mask, .. } => Some(*mask),
            _ => None,
        }
    }
}

/// One decoded instruction with its guard predicate.
#[derive(Clone, Debug)]
pub(crate) struct DInst {
    pub guard: Option<(Reg, bool)>,
    pub inst: Inst,
    /// Source text of the opcode (for error messages).
    pub opcode: String,
}

/// A function or kernel.
#[derive(Clone, Debug)]
pub(crate) struct Func {
    pub name: String,
    pub is_entry: bool,
    pub entry_pc: u32,
    pub frame_size: u32,
    pub param_offsets: Vec<u32>,
    pub param_sizes: Vec<u32>,
    pub ret_offset: Option<(u32, u32)>,
    pub callees: Vec<u32>,
    /// Shared symbols declared in this function's body.
    pub shared_syms: Vec<u32>,
    pub recursive: bool,
    pub reg_range: (u32, u32),
    pub num_regs: u32,
    pub maxntid: Option<u32>,
    /// Kernel parameter layout (entries only).
    pub kparams: Vec<crate::ParamInfo>,
    pub has_body: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct SharedSym {
    pub size: u64,
    pub align: u32,
    pub dynamic: bool,
    pub module_scope: bool,
}
