//! Driver entry points that cudarc's CUDA 13 bindings no longer list: old ABIs kept under their plain (or older
//! suffixed) names, and interop families (GL, EGL, VDPAU, NvSci) that cudart still looks up at start-up.
//!
//! `cuGetProcAddress(name, version)` must hand out the ABI that existed at `version` (cudart asks e.g. for
//! `cuStreamGetCaptureInfo` at 10010, 11030 and 12030 and gets three different signatures), and cuBLASLt `dlsym`s
//! some legacy names directly (`cuEventElapsedTime`, `cuGraphInstantiate`, `cuStreamGetCaptureInfo_v2`, ...). So
//! every such name is exported here too, with its old signature where devproxy implements it, or as a stub.
//!
//! Stubs take no arguments and return CUDA_ERROR_NOT_SUPPORTED after logging their name once: a C caller may pass
//! any arguments to a function that ignores them (SysV x86-64 and AAPCS64 leave argument cleanup to the caller).

use std::ffi::{c_uint, c_ulonglong, c_void};
use std::sync::atomic::AtomicBool;

use cudarc::driver::sys::{
    CUdevice, CUevent, CUgraph, CUgraphNode, CUresult, CUstream, CUstreamCaptureStatus, CUuuid,
};

use crate::table::{guard, unsupported, Entry, Sym};

macro_rules! stubs {
    ($($name:ident)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "` (legacy ABI): not supported; CUDA_ERROR_NOT_SUPPORTED.")]
            #[cfg_attr(not(test), no_mangle)]
            #[allow(non_snake_case)]
            pub extern "C" fn $name() -> CUresult {
                static LOGGED: AtomicBool = AtomicBool::new(false);
                guard(stringify!($name), || unsupported(stringify!($name), &LOGGED))
            }
        )*
        const STUBS: &[Entry] = &[
            $( Entry { name: stringify!($name), func: Sym($name as *const c_void), implemented: false }, )*
        ];
    };
}

stubs! {
    cuCtxCreate cuCtxCreate_v2 cuCtxCreate_v3
    cuStreamBatchMemOp cuStreamWaitValue32 cuStreamWaitValue64 cuStreamWriteValue32 cuStreamWriteValue64
    cuGraphInstantiate cuGraphInstantiate_v2 cuGraphKernelNodeGetParams cuGraphKernelNodeSetParams
    cuGraphExecKernelNodeSetParams cuGraphAddKernelNode cuGraphExecUpdate cuGraphAddDependencies
    cuGraphRemoveDependencies cuGraphGetEdges cuGraphNodeGetDependencies cuGraphNodeGetDependentNodes cuGraphAddNode
    cuIpcOpenMemHandle cuMemAdvise cuMemPrefetchAsync cuMemcpyBatchAsync cuMemcpy3DBatchAsync
    cuStreamBeginCapture cuStreamUpdateCaptureDependencies cuLinkCreate cuLinkAddData cuLinkAddFile
    cuDeviceGetNvSciSyncAttributes
    cuEGLStreamConsumerAcquireFrame cuEGLStreamConsumerConnect cuEGLStreamConsumerConnectWithFlags
    cuEGLStreamConsumerDisconnect cuEGLStreamConsumerReleaseFrame cuEGLStreamProducerConnect
    cuEGLStreamProducerDisconnect cuEGLStreamProducerPresentFrame cuEGLStreamProducerReturnFrame
    cuGraphicsEGLRegisterImage cuGraphicsResourceGetMappedEglFrame
    cuGLCtxCreate cuGLGetDevices cuGLInit cuGLMapBufferObject cuGLMapBufferObjectAsync cuGLRegisterBufferObject
    cuGLSetBufferObjectMapFlags cuGLUnmapBufferObject cuGLUnmapBufferObjectAsync cuGLUnregisterBufferObject
    cuGraphicsGLRegisterBuffer cuGraphicsGLRegisterImage
    cuGraphicsVDPAURegisterOutputSurface cuGraphicsVDPAURegisterVideoSurface cuVDPAUCtxCreate cuVDPAUGetDevice
}

/// Writes "not capturing" to the outputs every cuStreamGetCaptureInfo ABI shares.
///
/// # Safety
/// Each pointer null or writable.
unsafe fn not_capturing(status: *mut CUstreamCaptureStatus, id: *mut c_ulonglong) -> CUresult {
    crate::imp::ret(crate::imp::client().and_then(|_| {
        // SAFETY: caller contract; the driver leaves `id` untouched when not capturing, we zero it.
        unsafe {
            crate::imp::put(status, CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)?;
            let _ = crate::imp::put(id, 0);
        }
        Ok(())
    }))
}

macro_rules! legacy_fwd {
    ($($name:ident ( $($arg:ident : $ty:ty),* ) $body:block)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "` (legacy ABI), implemented.")]
            ///
            /// # Safety
            /// The driver API contract of this (old) signature.
            #[cfg_attr(not(test), no_mangle)]
            #[allow(non_snake_case)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
                guard(stringify!($name), || $body)
            }
        )*
        const IMPLEMENTED: &[Entry] = &[
            $( Entry { name: stringify!($name), func: Sym($name as *const c_void), implemented: true }, )*
        ];
    };
}

legacy_fwd! {
    cuDeviceGetUuid(uuid: *mut CUuuid, dev: CUdevice) {
        // SAFETY: same signature and contract as the _v2 ABI.
        unsafe { crate::imp::cuDeviceGetUuid_v2(uuid, dev) }
    }
    cuDevicePrimaryCtxRelease(dev: CUdevice) {
        // SAFETY: same contract as _v2.
        unsafe { crate::imp::cuDevicePrimaryCtxRelease_v2(dev) }
    }
    cuDevicePrimaryCtxReset(dev: CUdevice) {
        // SAFETY: same contract as _v2.
        unsafe { crate::imp::cuDevicePrimaryCtxReset_v2(dev) }
    }
    cuDevicePrimaryCtxSetFlags(dev: CUdevice, flags: c_uint) {
        // SAFETY: same contract as _v2.
        unsafe { crate::imp::cuDevicePrimaryCtxSetFlags_v2(dev, flags) }
    }
    cuEventElapsedTime(ms: *mut f32, start: CUevent, end: CUevent) {
        // SAFETY: same contract as _v2.
        unsafe { crate::imp::cuEventElapsedTime_v2(ms, start, end) }
    }
    cuStreamGetCaptureInfo(stream: CUstream, status: *mut CUstreamCaptureStatus, id: *mut c_ulonglong) {
        let _ = stream;
        // SAFETY: the caller passes null or writable outputs.
        unsafe { not_capturing(status, id) }
    }
    cuStreamGetCaptureInfo_v2(
        stream: CUstream,
        status: *mut CUstreamCaptureStatus,
        id: *mut c_ulonglong,
        graph: *mut CUgraph,
        deps: *mut *const CUgraphNode,
        num_deps: *mut usize
    ) {
        let _ = (stream, graph, deps, num_deps);
        // SAFETY: as above; the other outputs are only defined while capturing.
        unsafe { not_capturing(status, id) }
    }
}

/// Every legacy export, sorted by name.
pub static LEGACY: std::sync::LazyLock<Vec<Entry>> = std::sync::LazyLock::new(|| {
    let mut v: Vec<Entry> = STUBS.iter().chain(IMPLEMENTED).copied().collect();
    v.sort_by(|a, b| a.name.cmp(b.name));
    v
});

/// A legacy export by exact name.
pub fn find(name: &[u8]) -> Option<&'static Entry> {
    let v: &'static Vec<Entry> = &LEGACY;
    v.binary_search_by(|e| e.name.as_bytes().cmp(name))
        .ok()
        .map(|i| &v[i])
}

/// Any export (generated table first, then legacy) by exact name.
pub fn find_any(name: &[u8]) -> Option<&'static Entry> {
    crate::table::find(name).or_else(|| find(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_names_do_not_shadow_the_table() {
        for e in LEGACY.iter() {
            assert!(
                crate::table::find(e.name.as_bytes()).is_none(),
                "{} is both generated and legacy",
                e.name
            );
        }
        assert!(LEGACY.windows(2).all(|w| w[0].name < w[1].name));
        assert!(find(b"cuEventElapsedTime").is_some_and(|e| e.implemented));
        assert!(find(b"cuGLInit").is_some_and(|e| !e.implemented));
        assert_eq!(cuGLInit(), CUresult::CUDA_ERROR_NOT_SUPPORTED);
    }
}
