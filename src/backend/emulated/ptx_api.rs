//! Stand-in for the `devproxy-ptx` API until that crate lands: the same names and signatures, every parse fails.
//! Switched over by changing one `use` in `mod.rs`.
#![allow(dead_code)]

use std::fmt;

pub struct Module;

#[derive(Clone, Debug)]
pub struct KernelInfo {
    pub name: String,
    pub params: Vec<ParamInfo>,
    pub static_shared_bytes: u32,
    pub local_bytes_per_thread: u32,
    pub num_regs: u32,
    pub max_threads_per_block: u32,
}

#[derive(Clone, Debug)]
pub struct ParamInfo {
    pub offset: u32,
    pub size: u32,
    pub align: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalSpace {
    Global,
    Const,
}

#[derive(Clone, Debug)]
pub struct GlobalVar {
    pub name: String,
    pub space: GlobalSpace,
    pub size: u64,
    pub align: u32,
    pub init: Vec<u8>,
}

pub trait DeviceMemory: Sync {
    fn translate(&self, addr: u64, len: u64) -> Option<*mut u8>;
}

pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_shared_bytes: u32,
    pub max_dynamic_shared_bytes: u32,
    pub host_threads: usize,
}

pub struct LaunchStats {
    pub instructions: u64,
}

#[derive(Debug)]
pub enum PtxError {
    NotBuilt,
}

impl fmt::Display for PtxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the PTX interpreter is not built yet")
    }
}

#[derive(Debug)]
pub enum LaunchError {
    NoSuchKernel(String),
    InvalidConfig(String),
    IllegalAddress { kernel: String, addr: u64 },
    Unsupported { kernel: String, instruction: String },
    ParamSize { expected: usize, got: usize },
    Trap { kernel: String },
}

impl Module {
    pub fn parse(_ptx_text: &str) -> Result<Module, PtxError> {
        Err(PtxError::NotBuilt)
    }
    pub fn kernel_names(&self) -> Vec<String> {
        Vec::new()
    }
    pub fn kernel(&self, _name: &str) -> Option<KernelInfo> {
        None
    }
    pub fn globals(&self) -> &[GlobalVar] {
        &[]
    }
    pub fn launch(
        &self,
        name: &str,
        _cfg: &LaunchConfig,
        _params: &[u8],
        _global_addrs: &[u64],
        _mem: &dyn DeviceMemory,
    ) -> Result<LaunchStats, LaunchError> {
        Err(LaunchError::NoSuchKernel(name.to_string()))
    }
}
