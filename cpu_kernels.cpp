// A decoded token's CPU kernels: a few rows of x through int4 or int8 weights (quant_rows), and one
// row's attention over the KV cache (one_row_attention, at the end of the file). kernels.py compiles
// this file once per machine (kernels.cpu_library) and calls them as torch.ops.medmoe ops.
//
// Why the products by hand: PyTorch's _weight_int4pack_mm_for_cpu (and torchao's int4 CPU layout,
// which calls it) turns every int4 weight into a float and multiplies in floating point: ~35 G
// weights/s on two cores, slower than memory delivers 4-bit weights; _weight_int8pack_mm reads int8 weights
// at about half the speed memory delivers them. Here x is rounded to integers as well, with a scale
// per 32 inputs, and the products are integer dot products that keep up with memory (kernels.py
// and BENCHMARKS.md have the measurements): AVX512-VNNI's vpdpbusd multiplies 64 byte pairs in one
// instruction, vpdpwssd 32 pairs of 16-bit integers. Each kernel has an AVX2 loop and a portable
// one too, which also spells the arithmetic out one weight at a time.
//
// int4 (kernels._pack_int4): data [N/16][K/32][4][16][4] bytes: tiles of 16 rows; in block b of 32
// inputs, vector j (64 bytes) holds 4 bytes of each row i: byte t = q[32b+4j+t] | q[32b+16+4j+t] << 4.
// scales [N/16][K/g][2][16] bf16: per group of g inputs the 16 rows' scales, then their zeros, with
// w = (q - 8) * scale + zero. A tile's bytes are one contiguous stream (its scales another): one
// stream per thread, read ahead. Per block b, with x ~= sx[b] * xq:
//     sum w x = scale * sx[b] * sum (q - 8) xq  +  zero * sum x
// The zero term needs only each group's sum of x (xsum), computed once per row of x. x is rounded
// to int8 (as llama.cpp's Q8_0 does): its error stays small beside the weights'.
//
// int8: data [N][K] int8, scales [N] bf16, w = data * scale (one scale per row), so
//     sum w x = scale * sum_b sx[b] * sum data xq
// x is rounded to int16 here: rounded to int8 it doubled the error of int8 weights, and 16 bits
// cost no speed (the products are still faster than memory).
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#define AVX2 1
#else
#define AVX2 0
#endif
#if AVX2 && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define VNNI 1
#else
#define VNNI 0
#endif
#if AVX2
#include <immintrin.h>
#endif

static inline float from_bf16(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

#if AVX2
static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// f(m, row m of x as fp32) for each of x's M rows (fp32, or bf16 when bf16 = 1)
template <class F>
static void each_row(const void* x, int M, int K, int bf16, F f) {
  std::vector<float> row(bf16 ? K : 0);
  for (int m = 0; m < M; m++) {
    if (!bf16) {
      f(m, (const float*)x + (size_t)m * K);
      continue;
    }
    for (int k = 0; k < K; k++) row[k] = from_bf16(((const uint16_t*)x)[(size_t)m * K + k]);
    f(m, row.data());
  }
}

// The loops each kernel has: 0 portable, 1 AVX2, 2 AVX512-VNNI; this build's best
extern "C" int best_loop() { return VNNI ? 2 : AVX2 ? 1 : 0; }

static inline void store(void* y, size_t i, float v, int bf16) {
  if (bf16)
    ((uint16_t*)y)[i] = to_bf16(v);
  else
    ((float*)y)[i] = v;
}

// Every call rounds its rows of x (~200 calls a decoded token): xq = x / sx rounded, sx = the block's
// largest |x| / qmax. GCC vectorises these loops only when told that x holds no NaN or infinity
// and that sums may be reassociated (int4's xsum: its last bits change; xq and sx do not): one row
// through a 4-row, 2048-wide int4 matrix, nearly all of it this rounding, then takes 3.5 us
// instead of 7.2 (AVX-512; built for AVX2, 3.9 against 7.6). Not -ffast-math, which would also
// let 1 / s be approximated: xq must be what the tests round to.
#if defined(__GNUC__) && !defined(__clang__)
#define VECTORISE_ROUNDING __attribute__((optimize("no-trapping-math", "finite-math-only", "no-signed-zeros", "associative-math")))
#else
#define VECTORISE_ROUNDING
#endif

template <class T>
VECTORISE_ROUNDING static void round_blocks(const float* x, int K, float qmax, T* xq, float* sx) {
  for (int b = 0; b < K / 32; b++) {
    float amax = 0;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[32 * b + j]));
    float s = amax > 0 ? amax / qmax : 1, inv = 1 / s;
    sx[b] = s;
    for (int j = 0; j < 32; j++) xq[32 * b + j] = (T)nearbyintf(x[32 * b + j] * inv);
  }
}

// ----------------------------------------------------------------------------- int4

struct QuantizedRow {  // one row of x, rounded to int8
  const int8_t* xq;    // [K]
  const float* sx;     // [K/32] scale per 32-input block
  const int32_t* acc0; // [K/32] -8 * each block's sum of xq (where its integer sum starts, see below)
  const float* xsum;   // [K/g] x's sum per group of g
};

// x rounded to int8 for int4_rows, with each block's starting sum and the zero term's group sums
VECTORISE_ROUNDING static void quantize_row(const float* x, int K, int g, int8_t* xq, float* sx, int32_t* acc0, float* xsum) {
  round_blocks(x, K, 127, xq, sx);
  for (int b = 0; b < K / 32; b++) {
    int sum = 0;
    for (int j = 0; j < 32; j++) sum += xq[32 * b + j];
    acc0[b] = -8 * sum;
  }
  for (int gi = 0; gi < K / g; gi++) {
    float s = 0;
    for (int j = 0; j < g; j++) s += x[g * gi + j];
    xsum[gi] = s;
  }
}

// Row i's sum over groups of zero * (x's sum over the group)
static float zero_term(const uint16_t* sc, QuantizedRow x, int K, int g, int i) {
  float sum = 0;
  for (int gi = 0; gi < K / g; gi++) sum += from_bf16(sc[32 * gi + 16 + i]) * x.xsum[gi];
  return sum;
}

// The arithmetic in plain C++: one 16-row tile times one row of x -> y[0..15]. Each block's integer
// sums start from acc0 (-8 * the block's sum of xq), as the vector versions' do. (Written as
// (q - 8) * xq instead, GCC 12 vectorised it with vpdpbusd, which takes q as unsigned: wrong sums.)
// The loop over the tile's 16 rows is innermost, so that compilers vectorise it: 10.8 GB/s
// (5632x2048, 2 threads) against 1.7 for the same sums one row at a time.
static void tile_row_portable(const uint8_t* w, const uint16_t* sc, QuantizedRow x, int K, int g, float* y) {
  float acc[16] = {0};
  for (int b = 0; b < K / 32; b++) {
    const int8_t* xq = x.xq + 32 * b;
    int d[16];
    for (int i = 0; i < 16; i++) d[i] = x.acc0[b];
    for (int j = 0; j < 4; j++) {
      const uint8_t* v = w + 256 * b + 64 * j;  // row i's 4 bytes: inputs 4j..4j+3 (low), 16+4j.. (high)
      for (int i = 0; i < 16; i++) {
        for (int t = 0; t < 4; t++) d[i] += (v[4 * i + t] & 15) * xq[4 * j + t] + (v[4 * i + t] >> 4) * xq[16 + 4 * j + t];
      }
    }
    for (int i = 0; i < 16; i++) acc[i] += from_bf16(sc[32 * (32 * b / g) + i]) * x.sx[b] * d[i];
  }
  for (int i = 0; i < 16; i++) y[i] = acc[i] + zero_term(sc, x, K, g, i);
}

#if AVX2
// The same with AVX2: a vector's rows 0-7 and rows 8-15 are two 256-bit halves, and maddubs + madd
// add the products of 4 byte pairs into each 32-bit lane, as vpdpbusd does below.
static void tile_row_avx2(const uint8_t* w, const uint16_t* sc, QuantizedRow x, int K, int g, float* y) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int32_t* x4 = (const int32_t*)x.xq;  // xq's 4-input words
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, s[2] = {acc[0], acc[1]};
  for (int b = 0; b < K / 32; b++) {
    const uint8_t* v = w + 256 * b;
    for (int j = 0; j < 4; j++) _mm_prefetch((const char*)(v + 2048 + 64 * j), _MM_HINT_T0);
    for (int h = 0; h < 2; h++) {  // rows 8h..8h+7
      if (32 * b % g == 0) s[h] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(sc + 32 * (32 * b / g) + 8 * h))), 16));
      __m256i d = _mm256_set1_epi32(x.acc0[b]);
      for (int j = 0; j < 4; j++) {
        __m256i q = _mm256_loadu_si256((const __m256i*)(v + 64 * j + 32 * h));
        __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(q, low4), _mm256_set1_epi32(x4[8 * b + j]));
        __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), low4), _mm256_set1_epi32(x4[8 * b + 4 + j]));
        d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones));  // 16-bit sums stay below 2^15
      }
      acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s[h], _mm256_set1_ps(x.sx[b])), acc[h]);
    }
  }
  _mm256_storeu_ps(y, acc[0]);
  _mm256_storeu_ps(y + 8, acc[1]);
  for (int i = 0; i < 16; i++) y[i] += zero_term(sc, x, K, g, i);
}
#endif

#if VNNI
static inline __m512 bf16x16(const uint16_t* p) {  // 16 bf16 -> fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// The same with AVX512-VNNI: a 64-byte vector holds 4 bytes of each of the 16 rows, so
// vpdpbusd(d, q, 4 bytes of xq in every lane) adds 4 products into each row's lane, and after a
// block each lane holds its row's whole sum: no lanes to add up at the end. Why tiles of 16 rows: the
// tiles of 4 rows before (2 rows a vector, 8 lanes each) spent as many instructions moving scales
// into lanes and converting partial sums as multiplying: from cache (one 5632x2048 matrix, 2
// threads) they read 52 GB/s of weights, these 88; streamed, 44 against 51 where memory gives 60. Each block's sum starts
// at acc0 (-8 * the block's sum of xq), which subtracts the 8 for free. Two float sums (even and odd
// blocks), so that each multiply-add waits on the one before it only every other block.
static void tile_row_vnni(const uint8_t* w, const uint16_t* sc, QuantizedRow x, int K, int g, float* y) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int32_t* x4 = (const int32_t*)x.xq;  // xq's 4-input words
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, zsum = acc[0], s = acc[0];
  for (int b = 0; b < K / 32; b++) {
    if (32 * b % g == 0) {  // a new group: its 16 scales, and its zeros times x's sum over the group
      s = bf16x16(sc + 32 * (32 * b / g));
      zsum = _mm512_fmadd_ps(bf16x16(sc + 32 * (32 * b / g) + 16), _mm512_set1_ps(x.xsum[32 * b / g]), zsum);
    }
    const uint8_t* v = w + 256 * b;
    for (int j = 0; j < 4; j++) _mm_prefetch((const char*)(v + 2048 + 64 * j), _MM_HINT_T0);  // 2 KiB ahead: +8% streamed
    __m512i lo = _mm512_set1_epi32(x.acc0[b]), hi = _mm512_setzero_si512();
    for (int j = 0; j < 4; j++) {
      __m512i q = _mm512_loadu_si512(v + 64 * j);
      lo = _mm512_dpbusd_epi32(lo, _mm512_and_si512(q, low4), _mm512_set1_epi32(x4[8 * b + j]));
      hi = _mm512_dpbusd_epi32(hi, _mm512_and_si512(_mm512_srli_epi16(q, 4), low4), _mm512_set1_epi32(x4[8 * b + 4 + j]));
    }
    __m512 f = _mm512_mul_ps(s, _mm512_set1_ps(x.sx[b]));
    acc[b & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), f, acc[b & 1]);
  }
  _mm512_storeu_ps(y, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), zsum));
}
#endif

typedef void (*TileRow)(const uint8_t*, const uint16_t*, QuantizedRow, int, int, float*);
static const TileRow int4_loops[] = {  // indexed as best_loop() counts
    tile_row_portable,
#if AVX2
    tile_row_avx2,
#endif
#if VNNI
    tile_row_vnni,
#endif
};

// Several matrices that read the same x (q, k and v; gate and up) go through in one call: x is
// rounded once, and one parallel loop runs over all their units (int4's tiles, int8's rows).
// Unit u of the concatenation -> (its matrix, u within it).
static inline int matrix_of(const std::vector<int>& units, int& u) {
  int i = 0;
  while (u >= units[i]) u -= units[i++];
  return i;
}

// y[i] [M, N[i]] = x [M, K] @ w.T for each of the count int4 weights w = (data[i], scales[i]) above,
// p = (data[0..count), scales[0..count), y[0..count)). x and y are float32 (bf16 = 0) or bf16
// (bf16 = 1). loop: which of int4_loops[] (tests compare them), up to best_loop().
extern "C" void int4_rows(const void* x, int count, void* const* p, const int* N, int M, int K, int g, int bf16, int threads,
                          int loop) {
  const uint8_t* const* data = (const uint8_t* const*)p;
  const uint16_t* const* scales = (const uint16_t* const*)(p + count);
  void* const* y = p + 2 * count;
  std::vector<int8_t> xq((size_t)M * K);
  std::vector<float> sx((size_t)M * K / 32), xsum((size_t)M * K / g);
  std::vector<int32_t> acc0((size_t)M * K / 32);
  std::vector<QuantizedRow> rows(M);
  each_row(x, M, K, bf16, [&](int m, const float* xf) {
    int8_t* q = &xq[(size_t)m * K];
    float *s = &sx[(size_t)m * K / 32], *xs = &xsum[(size_t)m * K / g];
    int32_t* a = &acc0[(size_t)m * K / 32];
    quantize_row(xf, K, g, q, s, a, xs);
    rows[m] = {q, s, a, xs};
  });
  const TileRow tile_row = int4_loops[loop];
  std::vector<int> tiles(count);
  int total = 0;
  for (int i = 0; i < count; i++) total += tiles[i] = N[i] / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int u = 0; u < total; u++) {
    int t = u, i = matrix_of(tiles, t);
    for (int m = 0; m < M; m++) {  // the tile stays in cache while each row of x passes through it
      float out[16];
      tile_row(data[i] + (size_t)t * 8 * K, scales[i] + (size_t)t * 32 * (K / g), rows[m], K, g, out);
      for (int r = 0; r < 16; r++) store(y[i], (size_t)m * N[i] + 16 * t + r, out[r], bf16);
    }
  }
}

// ----------------------------------------------------------------------------- int8

struct Int16Row {   // one row of x, rounded to int16
  const int16_t* xq; // [K]
  const float* sx;   // [K/32] scale per 32-input block
};

// One row of the weight times one row of x, one weight at a time: sum_b sx[b] * sum data xq.
// The integer sums stay below 2^31: 32 products of at most 127 * 32767.
static float row_int8_portable(const int8_t* w, Int16Row x, int K) {
  float acc = 0;
  for (int b = 0; b < K / 32; b++) {
    int d = 0;
    for (int j = 0; j < 32; j++) d += w[32 * b + j] * x.xq[32 * b + j];
    acc += x.sx[b] * d;
  }
  return acc;
}

#if AVX2
// The same with AVX2: 16 weights widened to 16 bits, and madd adds the products of pairs into 8 lanes
static float row_int8_avx2(const int8_t* w, Int16Row x, int K) {
  __m256 acc = _mm256_setzero_ps();
  for (int b = 0; b < K / 32; b++) {
    __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + 32 * b)));
    __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + 32 * b + 16)));
    __m256i d = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)(x.xq + 32 * b))),
                                 _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i*)(x.xq + 32 * b + 16))));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(x.sx[b]), acc);
  }
  return hsum256(acc);
}
#endif

#if VNNI
// The same with AVX512-VNNI: a block of 32 weights widened to 16 bits is one vector, and vpdpwssd
// adds the products of its pairs into 16 lanes. Two blocks at a time, into two sums, so that each
// multiply-add waits on the one before it only every other block. No software prefetch: with one
// (512 B to 2 KiB ahead) one row through 24 different 5632x2048 matrices read 26-36 GB/s, without
// it 29-41 (the hardware's stream prefetcher follows a thread's one stream).
static float row_int8_vnni(const int8_t* w, Int16Row x, int K) {
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int b = 0; b < K / 32; b += 2) {
    for (int h = 0; h < 2; h++) {
      __m512i wb = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + 32 * (b + h))));
      __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wb, _mm512_loadu_si512(x.xq + 32 * (b + h)));
      acc[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(x.sx[b + h]), acc[h]);
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
}
#endif

typedef float (*Int8Row)(const int8_t*, Int16Row, int);
static const Int8Row int8_loops[] = {
    row_int8_portable,
#if AVX2
    row_int8_avx2,
#endif
#if VNNI
    row_int8_vnni,
#endif
};

// The same for int8 weights (data, scales) above, K a multiple of 64
extern "C" void int8_rows(const void* x, int count, void* const* p, const int* N, int M, int K, int bf16, int threads, int loop) {
  const int8_t* const* data = (const int8_t* const*)p;
  const uint16_t* const* scales = (const uint16_t* const*)(p + count);
  void* const* y = p + 2 * count;
  std::vector<int16_t> xq((size_t)M * K);
  std::vector<float> sx((size_t)M * K / 32);
  std::vector<Int16Row> rows(M);
  each_row(x, M, K, bf16, [&](int m, const float* xf) {
    round_blocks(xf, K, 32767, &xq[(size_t)m * K], &sx[(size_t)m * K / 32]);
    rows[m] = {&xq[(size_t)m * K], &sx[(size_t)m * K / 32]};
  });
  const Int8Row row = int8_loops[loop];
  std::vector<int> units(N, N + count);
  int total = 0;
  for (int i = 0; i < count; i++) total += N[i];
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int u = 0; u < total; u++) {  // each thread streams its rows, one after another
    int n = u, i = matrix_of(units, n);
    for (int m = 0; m < M; m++) {
      store(y[i], (size_t)m * N[i] + n, row(data[i] + (size_t)n * K, rows[m], K) * from_bf16(scales[i][n]), bf16);
    }
  }
}

// ----------------------------------------------------------------------------- one row's attention

// Why by hand: a decoded token's attention reads the whole KV cache (StableLM-2 with a 768-long bf16
// cache: 151 MB a token, 13% of what its int4 weights are) and does little arithmetic on it.
// PyTorch's forms read it slowly on a CPU: SDPA's kernel is made for blocks of queries, eager fp32
// matmuls first copy the cache to fp32, and inductor's fused loop reads it at two thirds of the
// memory's speed. Here each query row streams its key and value rows once, in fp32 arithmetic as
// medmoe.one_row_attention's matmuls do. 24 StableLM layers (2 threads, BENCHMARKS.md): 5.0-5.8 ms
// against inductor's 8.6 and the eager matmuls' 11.8-12.5. Written with GCC's vector extensions
// (16 fp32 lanes): the compiler makes AVX-512 of them where the CPU has it, AVX2 pairs otherwise.
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

static inline f32x16 load16(const void* p, int bf16, size_t i) {  // elements i..i+15 of p as fp32
  f32x16 v;
  if (!bf16) {
    memcpy(&v, (const float*)p + i, 64);
    return v;
  }
  u16x16 h;
  memcpy(&h, (const uint16_t*)p + i, 32);
  return (f32x16)(__builtin_convertvector(h, u32x16) << 16);  // bf16 is fp32's upper half
}

// e^x for x <= 0, Cephes' expf (within ~1 ulp): x = n ln2 + r, e^r by a degree-6 polynomial, times 2^n
static inline f32x16 exp16(f32x16 x) {
  x = x < -87.f ? f32x16{} - 87.f : x;  // e^-87 ~ 1.6e-38: 2^n stays a normal float
  i32x16 n = -__builtin_convertvector(0.5f - x * 1.44269504088896341f, i32x16);  // round(x / ln2): truncating a positive
  f32x16 nf = __builtin_convertvector(n, f32x16);
  f32x16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;            // ln2 in two parts, so r keeps its low bits
  f32x16 p = 1.9875691500E-4f * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.f;
  return (f32x16)((i32x16)p + (n << 23));  // times 2^n: n added to the exponent's bits
}

// 16 vectors -> one vector whose lane j is the sum of a[j]'s lanes: a tree of pairwise sums that
// transposes as it goes (45 operations for 16 dot products, against 16 horizontal sums of ~8 each).
// Level l pairs vectors and adds the lanes of each that lie 8 / 4 / 2 / 1 apart.
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, i32x16{__VA_ARGS__})
#endif
#define PAIR_SUM(a, b, L, H) (SHUFFLE(a, b, L) + SHUFFLE(a, b, H))
#define LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LO4 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define HI4 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
#define LO2 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29
#define HI2 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31
#define LO1 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define HI1 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
static inline f32x16 sum_lanes16(const f32x16* a) {
  f32x16 b[8], c[4], d[2];
  for (int i = 0; i < 8; i++) b[i] = PAIR_SUM(a[2 * i], a[2 * i + 1], LO8, HI8);
  for (int i = 0; i < 4; i++) c[i] = PAIR_SUM(b[2 * i], b[2 * i + 1], LO4, HI4);
  for (int i = 0; i < 2; i++) d[i] = PAIR_SUM(c[2 * i], c[2 * i + 1], LO2, HI2);
  return PAIR_SUM(d[0], d[1], LO1, HI1);
}

// One query row q [D] over keys and values k, v [S, D] where mask is 1: out [D] = softmax(q k / sqrt(D)) v,
// every product in fp32. p: room for S scores, rounded up to a multiple of 16.
static void attend_row(const void* q, const void* k, const void* v, const uint8_t* mask, void* out, int S, int D, int bf16,
                       float* p) {
  const f32x16 zero = {}, minus_inf = zero - INFINITY;
  f32x16 qs[8], o[8] = {}, mx = minus_inf, sum = zero;
  for (int c = 0; c < D / 16; c++) qs[c] = load16(q, bf16, 16 * c) / sqrtf((float)D);
  for (int s0 = 0; s0 < S; s0 += 16) {  // scores, 16 keys at a time
    f32x16 dots[16];
    i32x16 keep;
    for (int j = 0; j < 16; j++) {
      keep[j] = s0 + j < S && mask[s0 + j];  // past the end of the cache: as if masked
      dots[j] = zero;
      for (int c = 0; keep[j] && c < D / 16; c++) dots[j] += qs[c] * load16(k, bf16, (size_t)(s0 + j) * D + 16 * c);
    }
    f32x16 sc = keep != 0 ? sum_lanes16(dots) : minus_inf;
    memcpy(p + s0, &sc, 64);
    mx = mx > sc ? mx : sc;
  }
  float m = -INFINITY;
  for (int j = 0; j < 16; j++) m = fmaxf(m, mx[j]);
  for (int s0 = 0; s0 < S; s0 += 16) {  // e^(score - max); 0 where masked
    f32x16 x, e;
    memcpy(&x, p + s0, 64);
    e = x == minus_inf ? zero : exp16(x - m);
    memcpy(p + s0, &e, 64);
    sum += e;
  }
  for (int s = 0; s < S; s++)  // the values, weighted: a masked one (0) is not read
    for (int c = 0; p[s] != 0 && c < D / 16; c++) o[c] += p[s] * load16(v, bf16, (size_t)s * D + 16 * c);
  float total = 0;
  for (int j = 0; j < 16; j++) total += sum[j];
  for (int c = 0; c < D / 16; c++)
    for (int j = 0; j < 16; j++) store(out, 16 * c + j, o[c][j] / total, bf16);
}

// out [B, H, D] = attention of q [B, H, D] over the cache k, v [B, KVH, S, D] where mask [B, S] is 1.
// Query head h reads key/value head h / (H / KVH) (grouped-query attention). D a multiple of 16 up
// to 128; q, k, v, out all fp32 (bf16 = 0) or all bf16 (bf16 = 1).
extern "C" void one_row_attention(const void* q, const void* k, const void* v, const uint8_t* mask, void* out, int B, int H,
                                  int KVH, int S, int D, int bf16, int threads) {
  const size_t es = bf16 ? 2 : 4;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> p((S + 15) / 16 * 16);
#pragma omp for schedule(static)
    for (int bh = 0; bh < B * H; bh++) {
      size_t kv = (size_t)(bh / H) * KVH + bh % H / (H / KVH);
      attend_row((const char*)q + bh * D * es, (const char*)k + kv * S * D * es, (const char*)v + kv * S * D * es,
                 mask + (size_t)(bh / H) * S, (char*)out + bh * D * es, S, D, bf16, p.data());
    }
  }
}
