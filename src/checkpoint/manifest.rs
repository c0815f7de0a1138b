//! The manifest: everything in an image except the memory bytes, and the [`Persist`] implementations that produce
//! it from live server state and rebuild live state from it.
//!
//! States compose: an [`Object`] saves to an [`ObjectState`], a [`SessionState`] to a [`StateImage`] (its objects,
//! allocations, globals, pinned regions and pending errors), a session with its identity to a [`SessionImage`], and
//! the [`Manifest`] holds the device description, the sessions and the blob's [`Region`] table.

use super::{CheckpointError, Persist};
use crate::backend::{Backend, CtxId, ModuleId};
use crate::protocol::{CuError, DeviceInfo, Handle, ParamSlot};
use crate::server::session::{Allocation, Object, SessionState};
use bincode::{Decode, Encode};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Most sessions one image may hold.
pub const MAX_SESSIONS: usize = 1024;
/// Most objects (handles) per session.
pub const MAX_OBJECTS: usize = 1 << 20;
/// Most blob regions per image.
pub const MAX_REGIONS: usize = 1 << 22;

/// The device an image was taken on. Restore requires the same arena base (every device pointer lives in the arena)
/// and the same memory size.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct DeviceImage {
    pub backend: String,
    pub name: String,
    pub ordinal: u32,
    pub uuid: [u8; 16],
    pub total_mem: u64,
    pub arena_base: u64,
    /// The device's memory, rounded up to 2 MiB ([`memory_key`]): the size `devproxy serve --arena-gib` names and
    /// restore compares. Not the arena's address space (`DeviceInfo::arena_bytes`, several times larger since
    /// address space and memory were separated; the image does not record it). Images written before held the
    /// arena's size here, which then was the memory rounded the same way, so they compare alike.
    pub arena_bytes: u64,
}

/// The memory size an image records and restore compares: `total_mem` rounded up to 2 MiB (the arenas' granularity).
pub fn memory_key(total_mem: u64) -> u64 {
    total_mem.next_multiple_of(2 << 20)
}

impl DeviceImage {
    pub fn of(info: &DeviceInfo) -> DeviceImage {
        DeviceImage {
            backend: info.backend.clone(),
            name: info.name.clone(),
            ordinal: info.ordinal,
            uuid: info.uuid,
            total_mem: info.total_mem,
            arena_base: info.arena_base,
            arena_bytes: memory_key(info.total_mem),
        }
    }

    /// Whether state saved on `self` can be restored on `here`: the same arena base and memory size. (An allocation
    /// or mapping outside `here`'s address space, from a server configured with a larger one, fails when it is
    /// placed.)
    pub fn check_compatible(&self, here: &DeviceInfo) -> Result<(), CheckpointError> {
        let here_bytes = memory_key(here.total_mem);
        if self.arena_base != here.arena_base || self.arena_bytes != here_bytes {
            return Err(CheckpointError::Device {
                image_base: self.arena_base,
                image_bytes: self.arena_bytes,
                here_base: here.arena_base,
                here_bytes,
            });
        }
        if self.backend != here.backend {
            tracing::warn!(
                "image taken on the {} backend, restoring on the {} backend",
                self.backend,
                here.backend
            );
        }
        Ok(())
    }
}

/// A recreatable object behind a virtual handle.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub enum ObjectState {
    Stream {
        flags: u32,
        priority: i32,
    },
    Event {
        flags: u32,
    },
    Module {
        image: Vec<u8>,
    },
    Function {
        module: u64,
        name: String,
        params: Vec<(u32, u32)>,
        params_bytes: u32,
    },
    /// An address-space reservation (cuMemAddressReserve; PyTorch's expandable segments live in them), saved under
    /// handle 0 (no object has it): restore puts it back at its address before the mappings inside it are remade,
    /// so the process can map, unmap and free in it as before. Since image format 1.1.
    Reservation {
        addr: u64,
        bytes: u64,
    },
    /// A function attribute the process set (cuFuncSetAttribute), saved under handle 0 after the objects and set
    /// again on the reloaded function. Since image format 1.2.
    FuncAttribute {
        func: u64,
        attr: i32,
        value: i32,
    },
}

/// A module-scope variable whose bytes are in the blob.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
pub struct GlobalImage {
    /// The module's virtual handle.
    pub module: u64,
    pub name: String,
    pub ptr: u64,
    pub bytes: u64,
}

/// A session's state: what [`SessionState`] saves to.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub struct StateImage {
    pub next_handle: u64,
    /// (virtual handle, object), in handle order.
    pub objects: Vec<(u64, ObjectState)>,
    /// (device address, bytes), in address order.
    pub allocations: Vec<(u64, u64)>,
    /// Every module-scope variable of the session's modules (contents in the blob).
    pub module_globals: Vec<GlobalImage>,
    /// Variables the client asked for with cuModuleGetGlobal: (pointer, bytes), addressable by copies.
    pub client_globals: Vec<(u64, u64)>,
    /// Pinned host allocations: (offset in the pinned area, bytes) (contents in the blob).
    pub pinned: Vec<(u64, u64)>,
    /// A fire-and-forget failure not yet reported to the client (CUresult).
    pub deferred: Option<u32>,
    /// A sticky fault (CUresult).
    pub sticky: Option<u32>,
}

/// One session with its identity.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub struct SessionImage {
    pub id: u64,
    pub token: u64,
    pub pid: u32,
    pub command: String,
    /// The server socket the process polls after losing its server (restore binds it by default).
    pub socket: String,
    /// The ring sequence number the barrier stopped after.
    pub last_executed: u64,
    pub state: StateImage,
}

/// What a blob region holds.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// A device allocation: `addr` is its device address.
    Allocation,
    /// A module-scope variable: `addr` is its device address when saved (it may move on reload, see restore).
    ModuleGlobal,
    /// A pinned host allocation: `addr` is its offset in the session's pinned area.
    Pinned,
}

/// A run of blob bytes. Regions lie back to back in the blob in manifest order.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Index into [`Manifest::sessions`].
    pub session: u32,
    pub kind: RegionKind,
    pub addr: u64,
    pub bytes: u64,
}

/// The image manifest.
#[derive(Encode, Decode, Clone, Debug, PartialEq)]
pub struct Manifest {
    /// The devproxy release that wrote the image (informational; compatibility is the format version).
    pub writer: String,
    pub device: DeviceImage,
    pub sessions: Vec<SessionImage>,
    pub regions: Vec<Region>,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ super::format::MAX_MANIFEST_BYTES as usize }>()
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        bincode::encode_to_vec(self, config()).expect("bincode encode into Vec")
    }

    pub fn decode(bytes: &[u8], path: &str) -> Result<Manifest, CheckpointError> {
        let (m, used): (Manifest, usize) =
            bincode::decode_from_slice(bytes, config()).map_err(|e| {
                CheckpointError::invalid(path, format!("manifest does not decode: {e}"))
            })?;
        if used != bytes.len() {
            return Err(CheckpointError::invalid(
                path,
                format!("{} trailing bytes after the manifest", bytes.len() - used),
            ));
        }
        Ok(m)
    }

    /// Sum of the regions' sizes: the blob's length.
    pub fn blob_len(&self) -> u64 {
        self.regions.iter().map(|r| r.bytes).sum()
    }

    /// Structural checks (no device needed): counts, the blob length, every region inside its arena or area and
    /// matching the session tables, no overlapping allocations, handle references that resolve.
    pub fn validate(&self, blob_len: u64, path: &str) -> Result<(), CheckpointError> {
        let bad = |why: String| Err(CheckpointError::invalid(path, why));
        if self.sessions.is_empty() || self.sessions.len() > MAX_SESSIONS {
            return bad(format!(
                "{} sessions (1..={MAX_SESSIONS} allowed)",
                self.sessions.len()
            ));
        }
        if self.regions.len() > MAX_REGIONS {
            return bad(format!(
                "{} regions (at most {MAX_REGIONS})",
                self.regions.len()
            ));
        }
        let mut sum = 0u64;
        for r in &self.regions {
            sum = match sum.checked_add(r.bytes) {
                Some(s) => s,
                None => return bad("region sizes overflow".into()),
            };
        }
        if sum != blob_len {
            return bad(format!(
                "the regions add up to {sum} bytes but the blob is {blob_len} bytes"
            ));
        }
        // The address space is not recorded: any address from the base to the highest an arena may reach.
        let arena = (
            self.device.arena_base,
            crate::backend::ARENA_LIMIT.max(
                self.device
                    .arena_base
                    .saturating_add(self.device.arena_bytes),
            ),
        );
        for (i, s) in self.sessions.iter().enumerate() {
            let st = &s.state;
            if st.objects.len() > MAX_OBJECTS {
                return bad(format!(
                    "session {}: {} objects (at most {MAX_OBJECTS})",
                    s.id,
                    st.objects.len()
                ));
            }
            let mut prev_end = 0u64;
            for &(addr, bytes) in &st.allocations {
                let end = addr.checked_add(bytes);
                if bytes == 0
                    || addr < arena.0
                    || end.is_none_or(|e| e > arena.1)
                    || addr < prev_end
                {
                    return bad(format!(
                        "session {}: allocation {addr:#x} (+{bytes}) overlaps another or lies outside the arena",
                        s.id
                    ));
                }
                prev_end = end.unwrap_or(u64::MAX);
            }
            let handles: HashMap<u64, &ObjectState> =
                st.objects.iter().map(|(h, o)| (*h, o)).collect();
            for (h, o) in &st.objects {
                if let ObjectState::Reservation { addr, bytes } = *o {
                    let end = addr.checked_add(bytes);
                    if *h != 0 || bytes == 0 || addr < arena.0 || end.is_none_or(|e| e > arena.1) {
                        return bad(format!(
                            "session {}: reservation {addr:#x} (+{bytes}) lies outside the arena",
                            s.id
                        ));
                    }
                    continue;
                }
                if let ObjectState::FuncAttribute { func, .. } = *o {
                    if *h != 0 || !matches!(handles.get(&func), Some(ObjectState::Function { .. }))
                    {
                        return bad(format!(
                            "session {}: a function attribute names no function ({func:#x})",
                            s.id
                        ));
                    }
                    continue;
                }
                if *h == 0 || *h > st.next_handle {
                    return bad(format!("session {}: handle {h:#x} out of range", s.id));
                }
                if let ObjectState::Function { module, .. } = o {
                    if !matches!(handles.get(module), Some(ObjectState::Module { .. })) {
                        return bad(format!("session {}: function {h:#x} names no module", s.id));
                    }
                }
            }
            for g in &st.module_globals {
                if !matches!(handles.get(&g.module), Some(ObjectState::Module { .. })) {
                    return bad(format!(
                        "session {}: global '{}' names no module",
                        s.id, g.name
                    ));
                }
            }
            // Regions of this session must match its tables one to one, in order.
            let want: Vec<(RegionKind, u64, u64)> = st
                .allocations
                .iter()
                .map(|&(a, b)| (RegionKind::Allocation, a, b))
                .chain(
                    st.module_globals
                        .iter()
                        .map(|g| (RegionKind::ModuleGlobal, g.ptr, g.bytes)),
                )
                .chain(st.pinned.iter().map(|&(o, b)| (RegionKind::Pinned, o, b)))
                .collect();
            let got: Vec<(RegionKind, u64, u64)> = self
                .regions
                .iter()
                .filter(|r| r.session as usize == i)
                .map(|r| (r.kind, r.addr, r.bytes))
                .collect();
            if want != got {
                return bad(format!(
                    "session {}: the region table does not match its allocations",
                    s.id
                ));
            }
        }
        if self
            .regions
            .iter()
            .any(|r| r.session as usize >= self.sessions.len())
        {
            return bad("a region names a session the image does not hold".into());
        }
        Ok(())
    }
}

impl<'a> Persist<'a> for Object {
    type State = ObjectState;
    type SaveArgs = ();
    /// The backend, the new context, and the new ids of the modules already restored (by virtual handle).
    type RestoreArgs = (&'a Arc<dyn Backend>, CtxId, &'a HashMap<u64, ModuleId>);

    fn save(&self, _: ()) -> Result<ObjectState, CheckpointError> {
        Ok(match self {
            Object::Stream {
                flags, priority, ..
            } => ObjectState::Stream {
                flags: *flags,
                priority: *priority,
            },
            Object::Event { flags, .. } => ObjectState::Event { flags: *flags },
            Object::Module { image, .. } => ObjectState::Module {
                image: image.as_ref().clone(),
            },
            Object::Function {
                module,
                name,
                params,
                params_bytes,
                ..
            } => ObjectState::Function {
                module: module.0,
                name: name.clone(),
                params: params.iter().map(|p| (p.offset, p.size)).collect(),
                params_bytes: *params_bytes,
            },
        })
    }

    fn restore(
        (b, ctx, modules): Self::RestoreArgs,
        state: &ObjectState,
    ) -> Result<Object, CheckpointError> {
        let dev = |what: &str, e: CuError| CheckpointError::Backend(format!("{what}: {e}"));
        Ok(match state {
            ObjectState::Reservation { addr, .. } => {
                return Err(CheckpointError::Backend(format!(
                    "the reservation at {addr:#x} is not an object (restored with the session's memory)"
                )))
            }
            ObjectState::FuncAttribute { func, .. } => {
                return Err(CheckpointError::Backend(format!(
                    "the attribute of function {func:#x} is not an object (set after the functions are rebuilt)"
                )))
            }
            ObjectState::Stream { flags, priority } => Object::Stream {
                id: b
                    .stream_create(ctx, *flags, *priority)
                    .map_err(|e| dev("creating a stream", e))?,
                flags: *flags,
                priority: *priority,
            },
            ObjectState::Event { flags } => Object::Event {
                id: b
                    .event_create(ctx, *flags)
                    .map_err(|e| dev("creating an event", e))?,
                flags: *flags,
            },
            ObjectState::Module { image } => Object::Module {
                id: b
                    .module_load(ctx, image)
                    .map_err(|e| dev("reloading a module", e))?,
                image: Arc::new(image.clone()),
            },
            ObjectState::Function {
                module,
                name,
                params,
                params_bytes,
            } => {
                let mid = *modules.get(module).ok_or_else(|| {
                    CheckpointError::Backend(format!(
                        "function '{name}': its module was not restored"
                    ))
                })?;
                let (id, layout) = b
                    .module_function(mid, name)
                    .map_err(|e| dev(&format!("finding kernel '{name}'"), e))?;
                let saved: Vec<ParamSlot> = params
                    .iter()
                    .map(|&(offset, size)| ParamSlot { offset, size })
                    .collect();
                if layout.params != saved || layout.params_bytes != *params_bytes {
                    return Err(CheckpointError::Backend(format!(
                        "kernel '{name}' has another parameter layout after reload ({} bytes, was {params_bytes})",
                        layout.params_bytes
                    )));
                }
                Object::Function {
                    id,
                    module: Handle(*module),
                    name: name.clone(),
                    params: saved,
                    params_bytes: *params_bytes,
                }
            }
        })
    }
}

impl<'a> Persist<'a> for SessionState {
    type State = StateImage;
    type SaveArgs = ();
    /// The backend to rebuild on; restore returns the state with allocations made and objects rebuilt (memory
    /// contents are written afterwards, by the blob pipeline).
    type RestoreArgs = &'a Arc<dyn Backend>;

    fn save(&self, _: ()) -> Result<StateImage, CheckpointError> {
        let mut objects = Vec::with_capacity(self.objects.len());
        let mut module_globals = Vec::new();
        let mut handles: Vec<&Handle> = self.objects.keys().collect();
        handles.sort();
        for h in handles {
            let obj = &self.objects[h];
            objects.push((h.0, obj.save(())?));
            if let Object::Module { id, .. } = obj {
                let globals = self.backend.module_globals(*id).map_err(|e| {
                    CheckpointError::Backend(format!("listing module globals: {e}"))
                })?;
                for g in globals {
                    module_globals.push(GlobalImage {
                        module: h.0,
                        name: g.name,
                        ptr: g.ptr,
                        bytes: g.bytes,
                    });
                }
            }
        }
        // Reservations after the objects, under handle 0 (see ObjectState::Reservation).
        objects.extend(
            self.reservations
                .iter()
                .map(|(&addr, &bytes)| (0, ObjectState::Reservation { addr, bytes })),
        );
        // Then function attributes (of functions that still exist), also under handle 0.
        objects.extend(
            self.func_attrs
                .iter()
                .filter(|((f, _), _)| {
                    matches!(self.objects.get(&Handle(*f)), Some(Object::Function { .. }))
                })
                .map(|(&(func, attr), &value)| {
                    (0, ObjectState::FuncAttribute { func, attr, value })
                }),
        );
        Ok(StateImage {
            next_handle: self.next_handle(),
            objects,
            allocations: self
                .allocations
                .iter()
                .map(|(&a, al)| (a, al.bytes))
                .collect(),
            module_globals,
            client_globals: self.globals.iter().map(|(&p, &b)| (p, b)).collect(),
            pinned: self.pinned.iter().map(|(&o, &b)| (o, b)).collect(),
            deferred: self.deferred.map(|e| e.0),
            sticky: self.sticky.map(|e| e.0),
        })
    }

    fn restore(b: &'a Arc<dyn Backend>, st: &StateImage) -> Result<SessionState, CheckpointError> {
        let mut s = SessionState::new(b.clone())
            .map_err(|e| CheckpointError::Backend(format!("creating a context: {e}")))?;
        // Anything made so far is released again if a later step fails: never a half-restored session.
        match rebuild(&mut s, b, st) {
            Ok(()) => Ok(s),
            Err(e) => {
                s.teardown();
                Err(e)
            }
        }
    }
}

fn rebuild(
    s: &mut SessionState,
    b: &Arc<dyn Backend>,
    st: &StateImage,
) -> Result<(), CheckpointError> {
    // Reservations first: the mappings inside them are allocations that commit memory in them.
    for (_, o) in &st.objects {
        if let ObjectState::Reservation { addr, bytes } = *o {
            b.mem_reserve_at(addr, bytes).map_err(|e| {
                CheckpointError::Backend(format!(
                    "address range {addr:#x} (+{bytes}) cannot be reserved here ({e}): another session holds it"
                ))
            })?;
            s.reservations.insert(addr, bytes);
        }
    }
    for &(addr, bytes) in &st.allocations {
        b.mem_alloc_at(addr, bytes).map_err(|e| {
            CheckpointError::Backend(format!(
                "device range {addr:#x} (+{bytes}) is not free here ({e}): another session holds it"
            ))
        })?;
        s.allocations.insert(addr, Allocation { bytes });
    }
    let mut modules: HashMap<u64, ModuleId> = HashMap::new();
    // Modules first (functions name them), then everything else, each under its old handle.
    let (mods, rest): (Vec<_>, Vec<_>) = st
        .objects
        .iter()
        .filter(|(_, o)| {
            !matches!(
                o,
                ObjectState::Reservation { .. } | ObjectState::FuncAttribute { .. }
            )
        })
        .partition(|(_, o)| matches!(o, ObjectState::Module { .. }));
    for (h, o) in mods.into_iter().chain(rest) {
        let saved_globals: Vec<&GlobalImage> = st
            .module_globals
            .iter()
            .filter(|g| g.module == *h)
            .collect();
        let fillers = if matches!(o, ObjectState::Module { .. }) {
            reserve_around(b, s, &saved_globals)
        } else {
            Vec::new()
        };
        let obj = Object::restore((b, s.ctx, &modules), o);
        for f in fillers {
            let _ = b.mem_free(f);
        }
        let obj = obj?;
        if let Object::Module { id, .. } = &obj {
            modules.insert(*h, *id);
        }
        s.insert_at(Handle(*h), obj);
    }
    for (_, o) in &st.objects {
        if let ObjectState::FuncAttribute { func, attr, value } = *o {
            let id = match s.objects.get(&Handle(func)) {
                Some(Object::Function { id, .. }) => *id,
                _ => {
                    return Err(CheckpointError::Backend(format!(
                        "an attribute names function {func:#x}, which was not restored"
                    )))
                }
            };
            b.func_set_attribute(id, attr, value).map_err(|e| {
                CheckpointError::Backend(format!(
                    "setting attribute {attr} = {value} of function {func:#x} again: {e}"
                ))
            })?;
            s.func_attrs.insert((func, attr), value);
        }
    }
    s.module_bytes = s
        .objects
        .values()
        .map(|o| match o {
            Object::Module { image, .. } => image.len() as u64,
            _ => 0,
        })
        .sum();
    s.set_next_handle(st.next_handle);
    s.globals = st
        .client_globals
        .iter()
        .copied()
        .collect::<BTreeMap<u64, u64>>();
    s.pinned = st.pinned.iter().copied().collect();
    s.deferred = st.deferred.map(CuError);
    s.sticky = st.sticky.map(CuError);
    Ok(())
}

/// Makes a reloaded module's variables land where they were: while the module loads, every free arena range below
/// the last variable that the session does not need is held by a filler allocation, so the backend's first-fit placement can only use the
/// variables' old ranges. Only for variables inside the arena (the emulated device places them there; a real driver
/// places them itself, and they are then rebound by name, see `place_globals`). Returns the fillers to free.
fn reserve_around(b: &Arc<dyn Backend>, s: &SessionState, globals: &[&GlobalImage]) -> Vec<u64> {
    let info = b.info();
    let (base, end) = (info.arena_base, info.arena_base + info.arena_bytes);
    let align = crate::backend::arena::MIN_ALIGN;
    let mut keep: Vec<(u64, u64)> = globals
        .iter()
        .filter(|g| g.ptr >= base && g.ptr < end)
        .map(|g| (g.ptr, (g.ptr + g.bytes.max(1)).div_ceil(align) * align))
        .collect();
    if keep.is_empty() {
        return Vec::new();
    }
    keep.sort();
    // Ranges known to be taken: this session's allocations and variables of modules already reloaded.
    let mut taken: Vec<(u64, u64)> = s
        .allocations
        .iter()
        .map(|(&a, al)| (a, (a + al.bytes).div_ceil(align) * align))
        .collect();
    for obj in s.objects.values() {
        if let Object::Module { id, .. } = obj {
            for g in b.module_globals(*id).unwrap_or_default() {
                taken.push((g.ptr, (g.ptr + g.bytes.max(1)).div_ceil(align) * align));
            }
        }
    }
    // First fit takes the lowest range that fits, so only the gaps below the last variable need filling (fillers
    // count against the device's memory, which is smaller than the address space).
    let last = keep.iter().map(|&(_, e)| e).max().unwrap_or(base).min(end);
    taken.extend(keep.iter().copied());
    taken.retain(|&(a, _)| a < last);
    taken.sort();
    let mut fillers = Vec::new();
    let mut cursor = base;
    for (a, e) in taken.into_iter().chain(std::iter::once((last, last))) {
        if a > cursor && b.mem_alloc_at(cursor, a - cursor).is_ok() {
            fillers.push(cursor);
        }
        cursor = cursor.max(e);
    }
    fillers
}

/// After the modules are back: each saved variable's current address (by module and name). A variable that moved
/// (a real driver chose another address) is rebound: the client's table follows it, and a warning says so.
pub fn place_globals(s: &mut SessionState, st: &StateImage) -> Result<Vec<u64>, CheckpointError> {
    let mut out = Vec::with_capacity(st.module_globals.len());
    let mut cache: HashMap<u64, Vec<crate::backend::GlobalSym>> = HashMap::new();
    for g in &st.module_globals {
        let mid = s
            .module(Handle(g.module))
            .map_err(|e| CheckpointError::Backend(e.to_string()))?;
        let now = match cache.get(&g.module) {
            Some(v) => v,
            None => {
                let v = s.backend.module_globals(mid).map_err(|e| {
                    CheckpointError::Backend(format!("listing module globals: {e}"))
                })?;
                cache.entry(g.module).or_insert(v)
            }
        };
        let ptr = match now.iter().find(|n| n.name == g.name) {
            Some(n) if n.bytes == g.bytes => n.ptr,
            Some(_) | None => match s.backend.module_global(mid, &g.name) {
                Ok((p, bytes)) if bytes == g.bytes => p,
                _ => {
                    return Err(CheckpointError::Backend(format!(
                        "module variable '{}' ({} bytes) is missing after reload",
                        g.name, g.bytes
                    )))
                }
            },
        };
        if ptr != g.ptr {
            tracing::warn!(
                "module variable '{}' moved from {:#x} to {ptr:#x} on reload; pointers to it kept by the program are stale",
                g.name,
                g.ptr
            );
            if let Some(bytes) = s.globals.remove(&g.ptr) {
                s.globals.insert(ptr, bytes);
            }
        }
        out.push(ptr);
    }
    Ok(out)
}
