// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320: zlib's and crc32fast's) of consecutive segments of device
// memory, one segment per thread; the host combines the segments' CRCs in order.
extern "C" __global__ void devproxy_crc32(const unsigned char* __restrict__ data, unsigned long long len,
                                          unsigned long long seg, unsigned int* __restrict__ out,
                                          unsigned int nseg) {
    __shared__ unsigned int table[256];
    for (unsigned int i = threadIdx.x; i < 256; i += blockDim.x) {
        unsigned int c = i;
        for (int k = 0; k < 8; k++) c = (c & 1u) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
        table[i] = c;
    }
    __syncthreads();
    unsigned int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= nseg) return;
    unsigned long long p = (unsigned long long)s * seg;
    unsigned long long hi = p + seg < len ? p + seg : len;
    unsigned int c = 0xFFFFFFFFu;
    // Byte by byte up to a 4-byte boundary, then a word at a time (little-endian), then the tail.
    while (p < hi && (((unsigned long long)(data + p)) & 3ull) != 0) {
        c = table[(c ^ data[p]) & 0xFFu] ^ (c >> 8);
        p++;
    }
    while (p + 4 <= hi) {
        c ^= *(const unsigned int*)(data + p);
        c = table[c & 0xFFu] ^ (c >> 8);
        c = table[c & 0xFFu] ^ (c >> 8);
        c = table[c & 0xFFu] ^ (c >> 8);
        c = table[c & 0xFFu] ^ (c >> 8);
        p += 4;
    }
    while (p < hi) {
        c = table[(c ^ data[p]) & 0xFFu] ^ (c >> 8);
        p++;
    }
    out[s] = c ^ 0xFFFFFFFFu;
}
