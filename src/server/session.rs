//! One client process = one session: its virtual handles, allocations, pinned host memory and the thread that
//! executes its request ring in order.
//!
//! Everything a client can name goes through this table: a handle of the wrong kind or of another session is
//! `CUDA_ERROR_INVALID_HANDLE`, a copy or memset outside the session's own allocations is `CUDA_ERROR_INVALID_VALUE`,
//! so one client can neither read nor write another's memory through the API (kernels, as on a GPU, can address the
//! whole arena). The table also keeps how each object was created, which is what a checkpoint needs to rebuild it.

use crate::backend::{Backend, CtxId, EventId, FuncId, HostSpan, ModuleId, StreamId};
use crate::protocol::{CuError, Handle, ParamSlot};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// An object a virtual handle stands for, with what is needed to recreate it.
#[derive(Clone, Debug)]
pub enum Object {
    Stream {
        id: StreamId,
        flags: u32,
        priority: i32,
    },
    Event {
        id: EventId,
        flags: u32,
    },
    Module {
        id: ModuleId,
        image: Arc<Vec<u8>>,
    },
    Function {
        id: FuncId,
        module: Handle,
        name: String,
        params: Vec<ParamSlot>,
        params_bytes: u32,
    },
}

/// A device allocation of the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub bytes: u64,
}

/// Per-session state owned by the session thread.
pub struct SessionState {
    pub backend: Arc<dyn Backend>,
    pub ctx: CtxId,
    pub default_stream: StreamId,
    next_handle: u64,
    pub objects: HashMap<Handle, Object>,
    /// Device allocations by base address.
    pub allocations: BTreeMap<u64, Allocation>,
    /// Module-scope variables handed out by cuModuleGetGlobal: addressable by copies too.
    pub globals: BTreeMap<u64, u64>,
    /// Pinned host allocations: offset in the pinned area -> bytes.
    pub pinned: BTreeMap<u64, u64>,
    /// The first error of a fire-and-forget request not yet reported.
    pub deferred: Option<CuError>,
    /// A fault that poisons the session (like a GPU context after an illegal address).
    pub sticky: Option<CuError>,
    /// Registered host spans (staging, pinned allocations) to unregister at teardown.
    pub registered: Vec<HostSpan>,
    /// NCCL communicators by virtual handle (kept apart from `objects`: a checkpoint saves them per job).
    pub nccl: HashMap<Handle, Arc<crate::nccl::RankComm>>,
    /// Address-space reservations (cuMemAddressReserve): base -> bytes. Mappings inside them are ordinary entries
    /// of `allocations` (so checkpoints save them); the reservations themselves are not part of an image.
    pub reservations: BTreeMap<u64, u64>,
    /// Function attributes the process set (cuFuncSetAttribute, cuKernelSetAttribute): (function handle,
    /// attribute) -> value. A restore sets them again on the reloaded functions: PyTorch raises a kernel's dynamic
    /// shared memory limit once per process, so a launch after restore would otherwise fail with invalid argument.
    pub func_attrs: BTreeMap<(u64, i32), i32>,
    /// Bytes of the loaded module images (they go into an image's manifest).
    pub module_bytes: u64,
    /// Requests to execute before the ring, once the process re-attaches: a restored rank's NCCL group that the job
    /// barrier held it in (taken from the ring, not yet executed; see `crate::nccl::state`).
    pub replay: Vec<crate::protocol::Request>,
}

impl SessionState {
    pub fn new(backend: Arc<dyn Backend>) -> Result<SessionState, CuError> {
        let ctx = backend.context_create()?;
        let default_stream = backend.default_stream(ctx);
        Ok(SessionState {
            backend,
            ctx,
            default_stream,
            next_handle: 0x1000,
            objects: HashMap::new(),
            allocations: BTreeMap::new(),
            globals: BTreeMap::new(),
            pinned: BTreeMap::new(),
            deferred: None,
            sticky: None,
            registered: Vec::new(),
            nccl: HashMap::new(),
            reservations: BTreeMap::new(),
            func_attrs: BTreeMap::new(),
            module_bytes: 0,
            replay: Vec::new(),
        })
    }

    /// Mints a new virtual handle for `obj`.
    pub fn insert(&mut self, obj: Object) -> Handle {
        self.next_handle += 1;
        let h = Handle(self.next_handle);
        self.objects.insert(h, obj);
        h
    }

    /// Inserts an object under a known handle (restore).
    pub fn insert_at(&mut self, h: Handle, obj: Object) {
        self.next_handle = self.next_handle.max(h.0);
        self.objects.insert(h, obj);
    }

    pub fn next_handle(&self) -> u64 {
        self.next_handle
    }

    pub fn set_next_handle(&mut self, v: u64) {
        self.next_handle = self.next_handle.max(v);
    }

    pub fn stream(&self, h: Handle) -> Result<StreamId, CuError> {
        if h.is_null() {
            return Ok(self.default_stream);
        }
        match self.objects.get(&h) {
            Some(Object::Stream { id, .. }) => Ok(*id),
            _ => Err(CuError::INVALID_HANDLE),
        }
    }

    pub fn event(&self, h: Handle) -> Result<EventId, CuError> {
        match self.objects.get(&h) {
            Some(Object::Event { id, .. }) => Ok(*id),
            _ => Err(CuError::INVALID_HANDLE),
        }
    }

    pub fn module(&self, h: Handle) -> Result<ModuleId, CuError> {
        match self.objects.get(&h) {
            Some(Object::Module { id, .. }) => Ok(*id),
            _ => Err(CuError::INVALID_HANDLE),
        }
    }

    pub fn function(&self, h: Handle) -> Result<(FuncId, u32), CuError> {
        match self.objects.get(&h) {
            Some(Object::Function {
                id, params_bytes, ..
            }) => Ok((*id, *params_bytes)),
            _ => Err(CuError::INVALID_HANDLE),
        }
    }

    /// Checks that `[ptr, ptr + len)` lies inside one allocation of this session, or inside one of its reservations
    /// and mappings there placed back to back (a GPU copies across them as one range), or inside one module variable.
    pub fn check_range(&self, ptr: u64, len: u64) -> Result<(), CuError> {
        let end = ptr.checked_add(len).ok_or(CuError::INVALID_VALUE)?;
        let inside = |map: &BTreeMap<u64, u64>| {
            map.range(..=ptr)
                .next_back()
                .is_some_and(|(base, bytes)| end <= base + bytes)
        };
        let in_reservation = inside(&self.reservations);
        let in_alloc = self
            .allocations
            .range(..=ptr)
            .next_back()
            .is_some_and(|(&base, a)| {
                let mut reached = base + a.bytes;
                if reached <= ptr && len > 0 {
                    return false;
                }
                if !in_reservation {
                    return end <= reached;
                }
                for (&b, a) in self.allocations.range(reached..) {
                    if reached >= end || b != reached {
                        break;
                    }
                    reached = b + a.bytes;
                }
                end <= reached
            });
        if in_alloc || inside(&self.globals) {
            Ok(())
        } else {
            Err(CuError::INVALID_VALUE)
        }
    }

    /// Device memory held by the session.
    pub fn device_bytes(&self) -> u64 {
        self.allocations.values().map(|a| a.bytes).sum()
    }

    /// What an image holds besides device memory: pinned host memory and module images.
    pub fn host_bytes(&self) -> u64 {
        self.pinned.values().sum::<u64>() + self.module_bytes
    }

    /// Releases everything the session holds on the backend. Errors are logged, not returned: teardown must finish.
    pub fn teardown(&mut self) {
        let b = self.backend.clone();
        self.nccl.clear();
        if let Err(e) = b.context_synchronize(self.ctx) {
            tracing::debug!("session teardown: synchronize reported {e}");
        }
        let mut objs: Vec<(Handle, Object)> = self.objects.drain().collect();
        objs.sort_by_key(|(h, _)| *h);
        for (_, obj) in objs.iter() {
            let r = match obj {
                Object::Stream { id, .. } => b.stream_destroy(*id),
                Object::Event { id, .. } => b.event_destroy(*id),
                _ => Ok(()),
            };
            if let Err(e) = r {
                tracing::debug!("session teardown: {e}");
            }
        }
        for (_, obj) in objs.iter() {
            if let Object::Module { id, .. } = obj {
                if let Err(e) = b.module_unload(*id) {
                    tracing::debug!("session teardown: module unload: {e}");
                }
            }
        }
        for (addr, _) in std::mem::take(&mut self.allocations) {
            if let Err(e) = b.mem_free(addr) {
                tracing::warn!("session teardown: freeing {addr:#x}: {e}");
            }
        }
        for (addr, _) in std::mem::take(&mut self.reservations) {
            if let Err(e) = b.mem_unreserve(addr) {
                tracing::warn!("session teardown: releasing reservation {addr:#x}: {e}");
            }
        }
        for span in self.registered.drain(..) {
            let _ = b.host_unregister(span);
        }
        if let Err(e) = b.context_destroy(self.ctx) {
            tracing::debug!("session teardown: context destroy: {e}");
        }
    }
}
