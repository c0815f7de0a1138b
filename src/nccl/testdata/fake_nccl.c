/* A stand-in for libnccl.so.2 in unit tests (src/nccl/real.rs): the NCCL functions devproxy calls, with NCCL's
 * prototypes, each appending what it was given to a log the test reads back with fake_log(). */
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

typedef struct { char internal[128]; } ncclUniqueId;
static char logbuf[16384];
static size_t loglen;

static void lg(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(logbuf + loglen, sizeof logbuf - loglen, fmt, ap);
  va_end(ap);
  if (n > 0 && loglen + (size_t)n < sizeof logbuf) loglen += (size_t)n;
}

const char *fake_log(void) { return logbuf; }
int ncclGetVersion(int *v) { *v = 22805; return 0; }
int ncclGetUniqueId(ncclUniqueId *id) {
  memset(id, 0, sizeof *id);
  memcpy(id->internal, "FAKEID01", 8);
  id->internal[127] = 42;
  return 0;
}
int ncclCommInitRank(void **comm, int nranks, ncclUniqueId id, int rank) {
  if (id.internal[127] != 42) return 4;
  lg("init %d %d %.8s;", nranks, rank, id.internal);
  *comm = (void *)0x1234;
  return 0;
}
int ncclCommDestroy(void *c) { lg("destroy %p;", c); return 0; }
int ncclCommAbort(void *c) { lg("abort %p;", c); return 0; }
int ncclCommGetAsyncError(void *c, int *e) { (void)c; *e = 0; return 0; }
int ncclCommCount(void *c, int *n) { (void)c; *n = 1; return 0; }
int ncclCommUserRank(void *c, int *r) { (void)c; *r = 0; return 0; }
const char *ncclGetErrorString(int r) { (void)r; return "invalid argument (fake)"; }
const char *ncclGetLastError(void *c) { (void)c; return "count 13 is unlucky"; }
int ncclGroupStart(void) { lg("start;"); return 0; }
int ncclGroupEnd(void) { lg("end;"); return 0; }
int ncclAllReduce(const void *s, void *r, size_t n, int t, int op, void *c, void *st) {
  lg("allreduce %p %p %zu %d %d %p %p;", s, r, n, t, op, c, st);
  return 0;
}
int ncclBroadcast(const void *s, void *r, size_t n, int t, int root, void *c, void *st) {
  lg("broadcast %p %p %zu %d %d %p %p;", s, r, n, t, root, c, st);
  return 0;
}
int ncclReduce(const void *s, void *r, size_t n, int t, int op, int root, void *c, void *st) {
  lg("reduce %p %p %zu %d %d %d %p %p;", s, r, n, t, op, root, c, st);
  return 0;
}
int ncclAllGather(const void *s, void *r, size_t n, int t, void *c, void *st) {
  lg("allgather %p %p %zu %d %p %p;", s, r, n, t, c, st);
  return 0;
}
int ncclReduceScatter(const void *s, void *r, size_t n, int t, int op, void *c, void *st) {
  lg("reducescatter %p %p %zu %d %d %p %p;", s, r, n, t, op, c, st);
  return 0;
}
int ncclSend(const void *s, size_t n, int t, int peer, void *c, void *st) {
  lg("send %p %zu %d %d %p %p;", s, n, t, peer, c, st);
  return 0;
}
int ncclRecv(void *r, size_t n, int t, int peer, void *c, void *st) {
  lg("recv %p %zu %d %d %p %p;", r, n, t, peer, c, st);
  return n == 13 ? 4 : 0;
}
int ncclRedOpCreatePreMulSum(int *op, void *scalar, int t, int residence, void *c) {
  if (residence == 1) {
    float f;
    memcpy(&f, scalar, 4);
    lg("premul host %g %d %p;", f, t, c);
  } else {
    lg("premul dev %p %d %p;", scalar, t, c);
  }
  *op = 77;
  return 0;
}
int ncclRedOpDestroy(int op, void *c) { lg("opdestroy %d %p;", op, c); return 0; }
