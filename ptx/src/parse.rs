//! PTX text -> syntax tree. Only the syntax is checked here; meaning (types, operands) is checked by `decode`.

use crate::PtxError;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Tok {
    /// Identifiers, opcodes, directives, registers: anything made of `[A-Za-z0-9_$%.]` not starting with a digit.
    Word(String),
    /// Numeric literal, kept as text (decoded where its type is known).
    Num(String),
    Str(String),
    Punct(char),
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: u32,
}

fn lex(text: &str) -> Result<Vec<Token>, PtxError> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    let mut line = 1u32;
    let is_word =
        |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c == b'%' || c == b'.';
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
            continue;
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'/' && i + 1 < b.len() && b[i + 1] == b'/' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && i + 1 < b.len() && b[i + 1] == b'*' {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                if b[i] == b'\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 2;
            continue;
        }
        if c == b'"' {
            let start = i + 1;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Str(text[start..i.min(b.len())].to_string()),
                line,
            });
            i += 1;
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                // exponent sign in decimal floats: 1e-5
                i += 1;
                if i < b.len()
                    && (b[i] == b'-' || b[i] == b'+')
                    && (b[i - 1] == b'e' || b[i - 1] == b'E')
                    && !text[start..i].starts_with("0x")
                    && !text[start..i].starts_with("0f")
                    && !text[start..i].starts_with("0d")
                {
                    i += 1;
                }
            }
            out.push(Token {
                tok: Tok::Num(text[start..i].to_string()),
                line,
            });
            continue;
        }
        if is_word(c) {
            let start = i;
            while i < b.len() && is_word(b[i]) {
                i += 1;
            }
            // `::` inside opcodes (L1::no_allocate, shared::cta)
            while i + 2 < b.len() && b[i] == b':' && b[i + 1] == b':' && is_word(b[i + 2]) {
                i += 2;
                while i < b.len() && is_word(b[i]) {
                    i += 1;
                }
            }
            out.push(Token {
                tok: Tok::Word(text[start..i].to_string()),
                line,
            });
            continue;
        }
        if b",;:[]{}()+-@!|<>=".contains(&c) {
            out.push(Token {
                tok: Tok::Punct(c as char),
                line,
            });
            i += 1;
            continue;
        }
        return Err(PtxError::Parse {
            line,
            msg: format!("unexpected character {:?}", c as char),
        });
    }
    Ok(out)
}

/// A numeric literal.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Lit {
    Int(i128),
    /// `0fXXXXXXXX`
    F32(u32),
    /// `0dXXXXXXXXXXXXXXXX`
    F64(u64),
    /// decimal float `1.5`
    Float(f64),
}

pub(crate) fn parse_lit(s: &str) -> Option<Lit> {
    let t = s.trim_end_matches(['U', 'u']);
    if let Some(h) = t.strip_prefix("0f").or_else(|| t.strip_prefix("0F")) {
        return u32::from_str_radix(h, 16).ok().map(Lit::F32);
    }
    if let Some(h) = t.strip_prefix("0d").or_else(|| t.strip_prefix("0D")) {
        return u64::from_str_radix(h, 16).ok().map(Lit::F64);
    }
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u128::from_str_radix(h, 16)
            .ok()
            .map(|v| Lit::Int(v as i128));
    }
    if let Some(h) = t.strip_prefix("0b").or_else(|| t.strip_prefix("0B")) {
        return u128::from_str_radix(h, 2).ok().map(|v| Lit::Int(v as i128));
    }
    if t.contains(['.', 'e', 'E']) {
        return t.parse::<f64>().ok().map(Lit::Float);
    }
    if t.len() > 1 && t.starts_with('0') {
        return u128::from_str_radix(&t[1..], 8)
            .ok()
            .map(|v| Lit::Int(v as i128));
    }
    t.parse::<u128>().ok().map(|v| Lit::Int(v as i128))
}

/// An instruction operand as written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum AOp {
    /// A register, special register, label or symbol; `neg` for `!%p`.
    Name {
        name: String,
        neg: bool,
    },
    Imm(Lit),
    /// `{a, b, ...}`
    Vec(Vec<AOp>),
    /// `[base + off]`; base None for `[imm]`.
    Addr {
        base: Option<String>,
        off: i64,
    },
    /// `a|b` (two destinations: shfl value|pred, setp p|q)
    Pair(String, String),
    /// `( a, b )` argument lists of `call`
    List(Vec<AOp>),
    /// `_`
    Sink,
}

#[derive(Clone, Debug)]
pub(crate) struct AstVar {
    pub space: String,
    pub align: Option<u32>,
    pub vec: u32,
    pub ty: String,
    pub name: String,
    /// Array dimensions; a `None` entry is `[]` (extern unsized).
    pub dims: Vec<Option<u64>>,
    pub init: Option<Vec<AOp>>,
    pub is_extern: bool,
    pub line: u32,
}

#[derive(Clone, Debug)]
pub(crate) struct AstParam {
    pub ty: String,
    pub align: Option<u32>,
    pub name: String,
    pub array: Option<u64>,
}

#[derive(Clone, Debug)]
pub(crate) enum Stmt {
    Reg {
        ty: String,
        names: Vec<(String, Option<u32>)>,
    },
    Var(AstVar),
    Label(String),
    Open,
    Close,
    Inst {
        guard: Option<(String, bool)>,
        opcode: String,
        ops: Vec<AOp>,
        line: u32,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct AstFunc {
    pub name: String,
    pub is_entry: bool,
    pub rets: Vec<AstParam>,
    pub params: Vec<AstParam>,
    pub body: Option<Vec<Stmt>>,
    pub maxntid: Option<u32>,
    pub line: u32,
}

#[derive(Default, Debug)]
pub(crate) struct AstModule {
    pub vars: Vec<AstVar>,
    pub funcs: Vec<AstFunc>,
}

struct P {
    toks: Vec<Token>,
    i: usize,
}

impl P {
    fn line(&self) -> u32 {
        self.toks
            .get(self.i)
            .or(self.toks.last())
            .map(|t| t.line)
            .unwrap_or(0)
    }
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, PtxError> {
        Err(PtxError::Parse {
            line: self.line(),
            msg: msg.into(),
        })
    }
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i).map(|t| &t.tok)
    }
    fn peek_at(&self, k: usize) -> Option<&Tok> {
        self.toks.get(self.i + k).map(|t| &t.tok)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.i).map(|t| t.tok.clone());
        self.i += 1;
        t
    }
    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }
    fn eat_punct(&mut self, c: char) -> bool {
        if self.is_punct(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect_punct(&mut self, c: char) -> Result<(), PtxError> {
        if self.eat_punct(c) {
            Ok(())
        } else {
            self.err(format!("expected '{c}', found {:?}", self.peek()))
        }
    }
    fn word(&mut self) -> Result<String, PtxError> {
        match self.next() {
            Some(Tok::Word(w)) => Ok(w),
            t => {
                self.i -= 1;
                self.err(format!("expected a name, found {t:?}"))
            }
        }
    }
    fn peek_word(&self) -> Option<&str> {
        match self.peek() {
            Some(Tok::Word(w)) => Some(w),
            _ => None,
        }
    }
    fn number(&mut self) -> Result<i128, PtxError> {
        let neg = self.eat_punct('-');
        match self.next() {
            Some(Tok::Num(n)) => match parse_lit(&n) {
                Some(Lit::Int(v)) => Ok(if neg { -v } else { v }),
                _ => self.err(format!("expected an integer, found {n}")),
            },
            t => {
                self.i -= 1;
                self.err(format!("expected a number, found {t:?}"))
            }
        }
    }
    fn skip_to_semicolon(&mut self) {
        while let Some(t) = self.next() {
            if t == Tok::Punct(';') {
                break;
            }
        }
    }
}

pub(crate) fn parse(text: &str) -> Result<AstModule, PtxError> {
    let mut p = P {
        toks: lex(text)?,
        i: 0,
    };
    let mut m = AstModule::default();
    while let Some(t) = p.peek().cloned() {
        let line = p.line();
        match t {
            Tok::Word(w) => match w.as_str() {
                ".version" | ".address_size" => {
                    p.i += 1;
                    p.next();
                }
                ".target" => {
                    p.i += 1;
                    p.word()?;
                    while p.eat_punct(',') {
                        p.word()?;
                    }
                }
                ".file" => {
                    p.i += 1;
                    p.number()?;
                    if let Some(Tok::Str(_)) = p.peek() {
                        p.i += 1;
                    }
                    while p.eat_punct(',') {
                        p.number()?;
                    }
                }
                ".section" => {
                    // debug sections: skip the brace block
                    p.i += 1;
                    p.word()?;
                    let mut depth = 0;
                    while let Some(t) = p.next() {
                        match t {
                            Tok::Punct('{') => depth += 1,
                            Tok::Punct('}') => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                }
                ".visible" | ".weak" | ".common" => {
                    p.i += 1;
                }
                ".extern" => {
                    p.i += 1;
                    if matches!(p.peek_word(), Some(".func") | Some(".entry")) {
                        let f = parse_func(&mut p, line)?;
                        if f.body.is_some() {
                            return p.err("extern function with a body");
                        }
                        m.funcs.push(f);
                    } else {
                        let mut v = parse_var(&mut p, line)?;
                        v.is_extern = true;
                        m.vars.push(v);
                    }
                }
                ".entry" | ".func" => {
                    let f = parse_func(&mut p, line)?;
                    m.funcs.push(f);
                }
                ".global" | ".const" | ".shared" | ".local" => {
                    let v = parse_var(&mut p, line)?;
                    m.vars.push(v);
                }
                ".alias" => {
                    return p.err(".alias is not supported");
                }
                _ => return p.err(format!("unexpected {w} at module scope")),
            },
            _ => return p.err(format!("unexpected {t:?} at module scope")),
        }
    }
    Ok(m)
}

fn parse_param(p: &mut P) -> Result<AstParam, PtxError> {
    let sp = p.word()?;
    if sp != ".param" && sp != ".reg" {
        return p.err(format!("expected .param, found {sp}"));
    }
    let mut align = None;
    let mut ty = None;
    loop {
        let w = p.peek_word().map(str::to_string);
        match w.as_deref() {
            Some(".align") => {
                p.i += 1;
                align = Some(p.number()? as u32);
            }
            Some(".ptr") | Some(".global") | Some(".shared") | Some(".const") | Some(".local") => {
                p.i += 1;
            }
            Some(w) if w.starts_with('.') => {
                p.i += 1;
                ty = Some(w.to_string());
            }
            _ => break,
        }
    }
    let name = p.word()?;
    let mut array = None;
    if p.eat_punct('[') {
        array = Some(p.number()? as u64);
        p.expect_punct(']')?;
    }
    let Some(ty) = ty else {
        return p.err(format!("parameter {name} without a type"));
    };
    Ok(AstParam {
        ty,
        align,
        name,
        array,
    })
}

fn parse_param_list(p: &mut P) -> Result<Vec<AstParam>, PtxError> {
    p.expect_punct('(')?;
    let mut v = Vec::new();
    if p.eat_punct(')') {
        return Ok(v);
    }
    loop {
        v.push(parse_param(p)?);
        if p.eat_punct(')') {
            break;
        }
        p.expect_punct(',')?;
    }
    Ok(v)
}

fn parse_func(p: &mut P, line: u32) -> Result<AstFunc, PtxError> {
    let kind = p.word()?;
    let is_entry = kind == ".entry";
    let mut rets = Vec::new();
    if !is_entry && p.is_punct('(') {
        rets = parse_param_list(p)?;
    }
    let name = p.word()?;
    let mut params = Vec::new();
    if p.is_punct('(') {
        params = parse_param_list(p)?;
    }
    let mut maxntid = None;
    loop {
        let w = p.peek_word().map(str::to_string);
        match w.as_deref() {
            Some(".maxntid") | Some(".reqntid") => {
                p.i += 1;
                let mut prod = p.number()? as u32;
                while p.eat_punct(',') {
                    prod = prod.saturating_mul(p.number()? as u32);
                }
                maxntid = Some(maxntid.map_or(prod, |m: u32| m.min(prod)));
            }
            Some(".minnctapersm")
            | Some(".maxnreg")
            | Some(".maxnctapersm")
            | Some(".maxclusterrank") => {
                p.i += 1;
                p.number()?;
            }
            Some(".reqnctapercluster") | Some(".explicitcluster") => {
                return p.err("cluster launch directives are not supported");
            }
            Some(".noreturn") => {
                p.i += 1;
            }
            Some(".pragma") => {
                p.i += 1;
                p.skip_to_semicolon();
            }
            _ => break,
        }
    }
    let body = if p.eat_punct(';') {
        None
    } else {
        p.expect_punct('{')?;
        Some(parse_body(p)?)
    };
    Ok(AstFunc {
        name,
        is_entry,
        rets,
        params,
        body,
        maxntid,
        line,
    })
}

fn parse_var(p: &mut P, line: u32) -> Result<AstVar, PtxError> {
    let space = p.word()?;
    let mut align = None;
    let mut vec = 1;
    let mut ty = None;
    loop {
        let w = p.peek_word().map(str::to_string);
        match w.as_deref() {
            Some(".align") => {
                p.i += 1;
                align = Some(p.number()? as u32);
            }
            Some(".v2") => {
                p.i += 1;
                vec = 2;
            }
            Some(".v4") => {
                p.i += 1;
                vec = 4;
            }
            Some(".attribute") => {
                p.i += 1;
                p.expect_punct('(')?;
                while !p.eat_punct(')') {
                    p.next();
                }
            }
            Some(w) if w.starts_with('.') => {
                p.i += 1;
                ty = Some(w.to_string());
            }
            _ => break,
        }
    }
    let name = p.word()?;
    let mut dims = Vec::new();
    while p.eat_punct('[') {
        if p.eat_punct(']') {
            dims.push(None);
        } else {
            dims.push(Some(p.number()? as u64));
            p.expect_punct(']')?;
        }
    }
    let mut init = None;
    if p.eat_punct('=') {
        init = Some(parse_init(p)?);
    }
    p.expect_punct(';')?;
    let Some(ty) = ty else {
        return p.err(format!("variable {name} without a type"));
    };
    Ok(AstVar {
        space,
        align,
        vec,
        ty,
        name,
        dims,
        init,
        is_extern: false,
        line,
    })
}

fn parse_init(p: &mut P) -> Result<Vec<AOp>, PtxError> {
    let mut out = Vec::new();
    if p.eat_punct('{') {
        if p.eat_punct('}') {
            return Ok(out);
        }
        loop {
            if p.is_punct('{') {
                out.extend(parse_init(p)?);
            } else {
                out.push(parse_operand(p)?);
            }
            if p.eat_punct('}') {
                break;
            }
            p.expect_punct(',')?;
        }
    } else {
        out.push(parse_operand(p)?);
    }
    Ok(out)
}

fn parse_body(p: &mut P) -> Result<Vec<Stmt>, PtxError> {
    let mut out = Vec::new();
    let mut depth = 1;
    loop {
        let line = p.line();
        let Some(t) = p.peek().cloned() else {
            return p.err("unexpected end of file inside a function body");
        };
        match t {
            Tok::Punct('{') => {
                p.i += 1;
                depth += 1;
                out.push(Stmt::Open);
            }
            Tok::Punct('}') => {
                p.i += 1;
                depth -= 1;
                if depth == 0 {
                    return Ok(out);
                }
                out.push(Stmt::Close);
            }
            Tok::Punct('@') => {
                p.i += 1;
                let neg = p.eat_punct('!');
                let g = p.word()?;
                let opcode = p.word()?;
                let ops = parse_operands(p)?;
                out.push(Stmt::Inst {
                    guard: Some((g, neg)),
                    opcode,
                    ops,
                    line,
                });
            }
            Tok::Word(w) => {
                if p.peek_at(1) == Some(&Tok::Punct(':')) {
                    p.i += 2;
                    out.push(Stmt::Label(w));
                    continue;
                }
                match w.as_str() {
                    ".reg" => {
                        p.i += 1;
                        let mut ty = String::new();
                        while let Some(w) = p.peek_word() {
                            if w.starts_with('.') {
                                if w != ".v2" && w != ".v4" {
                                    ty = w.to_string();
                                } else {
                                    return p.err("vector registers are not supported");
                                }
                                p.i += 1;
                            } else {
                                break;
                            }
                        }
                        let mut names = Vec::new();
                        loop {
                            let n = p.word()?;
                            let mut cnt = None;
                            if p.eat_punct('<') {
                                cnt = Some(p.number()? as u32);
                                p.expect_punct('>')?;
                            }
                            names.push((n, cnt));
                            if !p.eat_punct(',') {
                                break;
                            }
                        }
                        p.expect_punct(';')?;
                        out.push(Stmt::Reg { ty, names });
                    }
                    ".local" | ".shared" | ".param" | ".const" | ".global" => {
                        let v = parse_var(p, line)?;
                        out.push(Stmt::Var(v));
                    }
                    ".pragma" | ".loc" | ".maxnreg" => {
                        p.skip_to_semicolon();
                    }
                    ".extern" => {
                        p.i += 1;
                        let mut v = parse_var(p, line)?;
                        v.is_extern = true;
                        out.push(Stmt::Var(v));
                    }
                    _ if w.starts_with('.') => {
                        return p.err(format!("unsupported directive {w} in a body"))
                    }
                    _ => {
                        p.i += 1;
                        let ops = parse_operands(p)?;
                        out.push(Stmt::Inst {
                            guard: None,
                            opcode: w,
                            ops,
                            line,
                        });
                    }
                }
            }
            t => return p.err(format!("unexpected {t:?} in a body")),
        }
    }
}

fn parse_operands(p: &mut P) -> Result<Vec<AOp>, PtxError> {
    let mut ops = Vec::new();
    if p.eat_punct(';') {
        return Ok(ops);
    }
    loop {
        ops.push(parse_operand(p)?);
        if p.eat_punct(';') {
            return Ok(ops);
        }
        p.expect_punct(',')?;
    }
}

fn parse_operand(p: &mut P) -> Result<AOp, PtxError> {
    match p.peek().cloned() {
        Some(Tok::Punct('{')) => {
            p.i += 1;
            let mut v = Vec::new();
            loop {
                v.push(parse_operand(p)?);
                if p.eat_punct('}') {
                    break;
                }
                p.expect_punct(',')?;
            }
            Ok(AOp::Vec(v))
        }
        Some(Tok::Punct('(')) => {
            p.i += 1;
            let mut v = Vec::new();
            if p.eat_punct(')') {
                return Ok(AOp::List(v));
            }
            loop {
                v.push(parse_operand(p)?);
                if p.eat_punct(')') {
                    break;
                }
                p.expect_punct(',')?;
            }
            Ok(AOp::List(v))
        }
        Some(Tok::Punct('[')) => {
            p.i += 1;
            let mut base = None;
            let mut off: i64 = 0;
            match p.peek().cloned() {
                Some(Tok::Word(w)) => {
                    p.i += 1;
                    base = Some(w);
                }
                Some(Tok::Num(_)) | Some(Tok::Punct('-')) => {
                    off = p.number()? as i64;
                }
                t => return p.err(format!("bad address {t:?}")),
            }
            if p.is_punct(',') {
                // texture/surface coordinates `[tex, {x, y}]`: kept only so the decoder can name the
                // (unsupported) instruction
                let mut v = vec![AOp::Name {
                    name: base.unwrap_or_default(),
                    neg: false,
                }];
                while p.eat_punct(',') {
                    v.push(parse_operand(p)?);
                }
                p.expect_punct(']')?;
                return Ok(AOp::List(v));
            }
            loop {
                if p.eat_punct('+') || p.is_punct('-') {
                    // `number` reads the sign of `[r-4]` and `[r+-4]`
                    off = off.wrapping_add(p.number()? as i64);
                } else {
                    break;
                }
            }
            p.expect_punct(']')?;
            Ok(AOp::Addr { base, off })
        }
        Some(Tok::Punct('!')) => {
            p.i += 1;
            let name = p.word()?;
            Ok(AOp::Name { name, neg: true })
        }
        Some(Tok::Punct('-')) => {
            p.i += 1;
            match p.next() {
                Some(Tok::Num(n)) => match parse_lit(&n) {
                    Some(Lit::Int(v)) => Ok(AOp::Imm(Lit::Int(-v))),
                    Some(Lit::Float(f)) => Ok(AOp::Imm(Lit::Float(-f))),
                    Some(Lit::F32(b)) => Ok(AOp::Imm(Lit::F32(b ^ 0x8000_0000))),
                    Some(Lit::F64(b)) => Ok(AOp::Imm(Lit::F64(b ^ (1 << 63)))),
                    None => p.err(format!("bad number {n}")),
                },
                t => p.err(format!("bad operand -{t:?}")),
            }
        }
        Some(Tok::Num(n)) => {
            p.i += 1;
            match parse_lit(&n) {
                Some(l) => Ok(AOp::Imm(l)),
                None => p.err(format!("bad number {n}")),
            }
        }
        Some(Tok::Word(w)) => {
            p.i += 1;
            if w == "_" {
                return Ok(AOp::Sink);
            }
            if p.eat_punct('|') {
                let b = p.word()?;
                return Ok(AOp::Pair(w, b));
            }
            // generic(sym) in initialisers
            if (w == "generic" || w == "mask") && p.is_punct('(') {
                return p.err(format!("{w}() initialisers are not supported"));
            }
            // `sym+4` in initialisers
            Ok(AOp::Name {
                name: w,
                neg: false,
            })
        }
        t => p.err(format!("unexpected {t:?} in operands")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(parse_lit("0f3F800000"), Some(Lit::F32(0x3f80_0000)));
        assert_eq!(
            parse_lit("0d3FF0000000000000"),
            Some(Lit::F64(0x3ff0_0000_0000_0000))
        );
        assert_eq!(parse_lit("0xff"), Some(Lit::Int(255)));
        assert_eq!(parse_lit("42U"), Some(Lit::Int(42)));
        assert_eq!(parse_lit("1.5"), Some(Lit::Float(1.5)));
    }

    #[test]
    fn operands_and_calls() {
        let m = parse(
            ".version 9.0\n.target sm_90\n.address_size 64\n\
             .func (.param .b32 r) f(.param .b32 a) { ld.param.b32 %r1, [a+0]; st.param.b32 [r+0], %r1; ret; }\n\
             .visible .entry k(.param .u64 p) { .reg .b32 %r<3>; .reg .pred %p<2>;\n\
             { .param .b32 param0; .param .b32 retval0; call.uni (retval0), f, (param0); }\n\
             @!%p1 bra $L1; shfl.sync.down.b32 %r1|%p1, %r2, 1, 31, -1; $L1: ret; }",
        )
        .unwrap();
        assert_eq!(m.funcs.len(), 2);
        let body = m.funcs[1].body.as_ref().unwrap();
        assert!(body
            .iter()
            .any(|s| matches!(s, Stmt::Inst { opcode, .. } if opcode == "call.uni")));
        assert!(body
            .iter()
            .any(|s| matches!(s, Stmt::Label(l) if l == "$L1")));
    }
}
