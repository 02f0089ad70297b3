// The CPU's int8-weight grouped matmul, an XLA FFI custom call (AVX-512).
//
// Sorted rows a = 0 .. A-1 come in groups: group g is the next group_sizes[g]
// of them, multiplied by the weight of stack entry first + g:
//   y[a] [N] = x[rows[a]] [K] @ (weight[first + g] [K, N] * scales[first + g])
// in float32, the scales [R, N] (bfloat16 or float32) applied by row block of
// K / R weight rows, each int8 weight and its scales read where they lie in
// their stacks [S..., K, N] and [S..., R, N] (entries counted over the leading
// axes flattened, which XLA would otherwise copy to flatten). `rows` empty
// means rows[a] = a.
// Output: with `targets` empty, out [A, N] holds y[a] in row a, and rows past
// the last group are 0. Otherwise out [T, N] is zeroed and every y[a] is
// added to row targets[a], times row_scales[a].
// One group of all rows is a plain matmul. An MoE layer's (token, expert)
// assignments sorted by expert are one call per projection: rows = their
// tokens (the gather), groups = the experts' row counts, and for the down
// projection targets = their tokens, row_scales = their gates (the weighted
// scatter-add). Every expert's rows run at once, with no tiles of padding,
// and an expert with no rows is never read.
//
// XLA's own CPU code writes a converted float32 copy of an int8 weight and
// then runs a separate matmul over it, whose rate for a few dozen rows (an
// expert's share) is well below its large-matmul rate. Here the conversion
// is fused into the packing every matmul does anyway:
//   1. The columns are cut into panels of kPanel (48) and each group's rows
//      into chunks of kRowChunk: an item is a (group, row chunk, panel). A
//      unit of work is one item, or with `targets` the items of a range of
//      panels, one range per thread (so that no two threads add to the same
//      output element). The calling
//      thread and the tasks it schedules on XLA's intra-op thread pool take
//      units from an atomic counter.
//   2. For each block of kDepth rows of the weight, an item converts the
//      panel's int8 values to float32, multiplies them by their scales (the
//      products `quant.dequantize` forms) and packs them, zero-padded to 48
//      columns, into a buffer that stays in L1.
//   3. A register tile of kTileRows rows x 48 columns (24 AVX-512 registers)
//      runs down the block: per weight row, 3 vector loads, one broadcast of
//      x per tile row and 24 fused multiply-adds, adding to the item's sums
//      [rows, 48]. Tiles of fewer rows take the chunk's last rows; columns
//      past the panel's end are masked.
//   4. The item's sums go to their output rows.
// A row chunk of at most kFewRows rows (decoding) skips the packing, which
// would cost more than its products, and the panels, whose 48 bytes per weight
// row are strided reads from memory: it is cut in depth into pieces (enough to
// give each thread two), each a unit that reads its weight rows whole and in
// order, 4 at a time, converting the int8 values in registers and adding their
// products into its own partial sums [rows, N] (scaled as each scale row block
// ends); the caller adds the pieces up and writes (or scatter-adds) the rows
// once every unit is done. One row by an expert's [512, 2736] or [2736, 512]
// int8 weight read from memory took 2.0 - 4.3x less time this way than by
// panels (benchmarks/README.md).
// Sums are float32: x @ dequantize(w) up to float32 rounding.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "grok_moe's native int8 matmul needs AVX-512 F, BW and VL (it is built with -march=native)"
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 48;         // columns of an item: 3 AVX-512 vectors
constexpr int64_t kTileRows = 8;       // rows of a register tile: 8 x 3 accumulators
constexpr int64_t kDepth = 256;        // weight rows packed at a time: 48 KiB as float32
constexpr int64_t kRowChunk = 256;     // rows of an item
constexpr int64_t kPrefetchRows = 16;  // how far ahead a panel's weight rows are fetched
constexpr int64_t kFewRows = 4;        // chunks of at most this many rows are split in depth
constexpr int64_t kMinPieceRows = 64;  // weight rows of a few-row chunk's piece, at least
constexpr int64_t kPrefetchBytes = 8192;  // how far ahead a piece's weight is fetched, at least
constexpr int64_t kSpins = 4096;       // pauses before a waiting caller yields its core

// The `mode` attribute's bits: which of the optional arguments are given (an
// absent one is passed as an empty array).
constexpr int32_t kGather = 1;     // rows: sorted row a is x[rows[a]]
constexpr int32_t kScatter = 2;    // targets: products are added onto out[targets[a]]
constexpr int32_t kRowScales = 4;  // row_scales: the factor of each added product

struct Problem {
  const float* x;           // [T, K]
  int64_t x_rows;           // T
  const int8_t* weight;     // [S, K, N]
  const void* scales;       // [S, R, N], bfloat16 or float32
  bool float_scales;        // scales are float32 (else bfloat16)
  const int32_t* rows;      // [A], or null: row a of x
  const int32_t* targets;   // [A], or null: out rows are the sorted rows
  const float* row_scales;  // [A], or null: 1
  float* out;               // [A, N] or [T', N]
  int64_t depth, cols, blocks;  // K, N, R
  float* partials;          // the few-row pieces' sums, [rows, Stride(N)] each
};

// The row stride of sums: N rounded up to whole vectors, so that every row is aligned.
int64_t Stride(int64_t cols) { return (cols + 15) / 16 * 16; }

// Sorted rows row_begin .. row_end by stack entry `entry`: the columns of `panel`
// (partial < 0), or for a chunk of few rows, all columns over weight rows
// k_begin .. k_end into the sums at p.partials + partial.
struct Item {
  int64_t entry, row_begin, row_end, panel;
  int64_t k_begin = 0, k_end = 0, partial = -1;
};

__mmask16 Mask(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

// 16 scales from `source` (bfloat16 or float32) as float32, lanes off `mask` 0.
__m512 LoadScales(const Problem& p, const char* source, __mmask16 mask) {
  if (p.float_scales) {
    return _mm512_maskz_loadu_ps(mask, source);
  }
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, source);  // bfloat16: float32's top half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Weight rows k0 .. k0 + depth of the item's stack entry, columns n0 .. n0 + width,
// times their scales, as float32 into packed [depth, 48], columns past `width` 0.
void PackPanel(const Problem& p, const Item& item, int64_t k0, int64_t depth, int64_t n0,
               int64_t width, float* packed) {
  const int8_t* weight = p.weight + item.entry * p.depth * p.cols;
  const int64_t scale_size = p.float_scales ? 4 : 2;
  const char* scales =
      static_cast<const char*>(p.scales) + item.entry * p.blocks * p.cols * scale_size;
  const int64_t block_rows = p.depth / p.blocks;
  for (int64_t k = 0; k < depth; ++k) {
    const int8_t* source = weight + (k0 + k) * p.cols + n0;
    if (k + kPrefetchRows < depth) {  // a panel's rows are strided: help the prefetcher
      _mm_prefetch(reinterpret_cast<const char*>(source + kPrefetchRows * p.cols), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(source + kPrefetchRows * p.cols + kPanel - 1),
                   _MM_HINT_T0);
    }
    const char* scale = scales + ((k0 + k) / block_rows * p.cols + n0) * scale_size;
    for (int64_t j = 0; j < kPanel; j += 16) {
      const __mmask16 mask = Mask(width - j);
      const __m128i values = _mm_maskz_loadu_epi8(mask, source + j);
      const __m512 converted = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(values));
      const __m512 scaled = _mm512_mul_ps(converted, LoadScales(p, scale + j * scale_size, mask));
      _mm512_store_ps(packed + k * kPanel + j, scaled);
    }
  }
}

// sums [tile_rows, 48] (+)= x rows (at x_rows[r] + k0) [tile_rows, depth] @ packed [depth, 48].
template <int64_t tile_rows>
void Tile(const float* const* x_rows, int64_t k0, const float* packed, int64_t depth,
          float* sums, bool first) {
  __m512 acc[tile_rows][3];
  const float* x[tile_rows];
  for (int64_t r = 0; r < tile_rows; ++r) {
    x[r] = x_rows[r] + k0;
    for (int64_t j = 0; j < 3; ++j) {
      acc[r][j] = first ? _mm512_setzero_ps() : _mm512_load_ps(sums + r * kPanel + 16 * j);
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    const __m512 b0 = _mm512_load_ps(packed + k * kPanel);
    const __m512 b1 = _mm512_load_ps(packed + k * kPanel + 16);
    const __m512 b2 = _mm512_load_ps(packed + k * kPanel + 32);
    for (int64_t r = 0; r < tile_rows; ++r) {
      const __m512 a = _mm512_set1_ps(x[r][k]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
    }
  }
  for (int64_t r = 0; r < tile_rows; ++r) {
    for (int64_t j = 0; j < 3; ++j) {
      _mm512_store_ps(sums + r * kPanel + 16 * j, acc[r][j]);
    }
  }
}

// Tile<rows> for 1 <= rows <= tile_rows.
template <int64_t tile_rows>
void TileOf(int64_t rows, const float* const* x_rows, int64_t k0, const float* packed,
            int64_t depth, float* sums, bool first) {
  if constexpr (tile_rows > 0) {
    if (rows == tile_rows) {
      Tile<tile_rows>(x_rows, k0, packed, depth, sums, first);
    } else {
      TileOf<tile_rows - 1>(rows, x_rows, k0, packed, depth, sums, first);
    }
  }
}

// sums [rows, Stride(N)] += x rows [rows, n weight rows from k] @ those n rows
// (w [n, N]), all columns: the n rows are converted and used once, and each
// vector of sums is loaded and stored once for the n.
template <int64_t rows, int64_t n>
inline void AddWeightRows(const int8_t* w, int64_t cols, const float* const* x_rows, int64_t k,
                          float* sums) {
  const int64_t vectors = Stride(cols) / 16;
  const int64_t ahead = std::max<int64_t>(kPrefetchBytes, 4 * cols);
  __m512 a[rows][n];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < n; ++i) a[r][i] = _mm512_set1_ps(x_rows[r][k + i]);
  }
  for (int64_t j = 0; j < vectors; ++j) {
    const __mmask16 mask = Mask(cols - 16 * j);
    if (n == 4) {  // a line per vector: the next 4 rows' bytes, or kPrefetchBytes ahead
      _mm_prefetch(reinterpret_cast<const char*>(w) + ahead + 64 * j, _MM_HINT_T0);
    }
    __m512 values[n];
    for (int64_t i = 0; i < n; ++i) {
      values[i] = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + i * cols + 16 * j)));
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* sum = sums + r * Stride(cols) + 16 * j;
      __m512 acc = _mm512_load_ps(sum);
      for (int64_t i = 0; i < n; ++i) acc = _mm512_fmadd_ps(a[r][i], values[i], acc);
      _mm512_store_ps(sum, acc);
    }
  }
}

// partial [rows, Stride(N)] = x rows [rows, k_begin..k_end] @ (the item's weight
// rows k_begin .. k_end * their scales), all columns, for chunks of few rows
// (decoding), where packing would cost more than the products. The weight rows
// are read whole and in order, 4 at a time: one stream through memory, where a
// panel's 48 bytes per row would be strided reads. Each scale row block's sums
// are formed in `block` and scaled into the partial as the block ends.
template <int64_t rows>
void SplitDepth(const Problem& p, const Item& item, const float* const* x_rows, float* partial,
                float* block) {
  const int64_t stride = Stride(p.cols);
  const int8_t* weight = p.weight + item.entry * p.depth * p.cols;
  const int64_t scale_size = p.float_scales ? 4 : 2;
  const char* scales =
      static_cast<const char*>(p.scales) + item.entry * p.blocks * p.cols * scale_size;
  const int64_t block_rows = p.depth / p.blocks;
  for (int64_t k = item.k_begin; k < item.k_end;) {
    const int64_t b = k / block_rows;
    const int64_t end = std::min(item.k_end, (b + 1) * block_rows);
    const bool first = k == item.k_begin;
    std::fill(block, block + rows * stride, 0.0f);
    for (; k + 4 <= end; k += 4) {
      AddWeightRows<rows, 4>(weight + k * p.cols, p.cols, x_rows, k, block);
    }
    for (; k < end; ++k) {
      AddWeightRows<rows, 1>(weight + k * p.cols, p.cols, x_rows, k, block);
    }
    for (int64_t j = 0; j < stride / 16; ++j) {
      const __m512 scale = LoadScales(p, scales + (b * p.cols + 16 * j) * scale_size,
                                      Mask(p.cols - 16 * j));
      for (int64_t r = 0; r < rows; ++r) {
        float* total = partial + r * stride + 16 * j;
        const __m512 sums = _mm512_load_ps(block + r * stride + 16 * j);
        _mm512_store_ps(total, first ? _mm512_mul_ps(sums, scale)
                                     : _mm512_fmadd_ps(sums, scale, _mm512_load_ps(total)));
      }
    }
  }
}

// SplitDepth<rows> for 1 <= rows <= most.
template <int64_t most>
void SplitDepthOf(int64_t rows, const Problem& p, const Item& item, const float* const* x_rows,
                  float* partial, float* block) {
  if constexpr (most > 0) {
    if (rows == most) {
      SplitDepth<most>(p, item, x_rows, partial, block);
    } else {
      SplitDepthOf<most - 1>(rows, p, item, x_rows, partial, block);
    }
  }
}

// float buffers aligned for AVX-512 loads.
struct AlignedDelete {
  void operator()(float* data) const { ::operator delete[](data, std::align_val_t{64}); }
};
using AlignedFloats = std::unique_ptr<float[], AlignedDelete>;
AlignedFloats NewAligned(int64_t size) {
  return AlignedFloats(static_cast<float*>(
      ::operator new[](std::max<int64_t>(size, 1) * sizeof(float), std::align_val_t{64})));
}

// Thread-local buffers: the packed weight block and an item's sums, and a
// few-row item's block sums [kFewRows, Stride(N)] (grown as needed).
struct Scratch {
  alignas(64) float packed[kDepth * kPanel];
  alignas(64) float sums[kRowChunk * kPanel];
  const float* x_rows[kRowChunk];
  AlignedFloats block;
  int64_t block_size = 0;

  float* Block(int64_t size) {
    if (size > block_size) {
      block = NewAligned(size);
      block_size = size;
    }
    return block.get();
  }
};

void RunItem(const Problem& p, const Item& item, Scratch& scratch) {
  const int64_t n0 = item.panel * kPanel;
  const int64_t width = std::min(kPanel, p.cols - n0);
  const int64_t count = item.row_end - item.row_begin;
  for (int64_t m = 0; m < count; ++m) {
    const int64_t a = item.row_begin + m;
    const int64_t row = p.rows ? std::clamp<int64_t>(p.rows[a], 0, p.x_rows - 1) : a;
    scratch.x_rows[m] = p.x + row * p.depth;
  }
  if (item.partial >= 0) {
    SplitDepthOf<kFewRows>(count, p, item, scratch.x_rows, p.partials + item.partial,
                           scratch.Block(kFewRows * Stride(p.cols)));
    return;
  }
  __mmask16 masks[3];
  for (int64_t j = 0; j < 3; ++j) masks[j] = Mask(width - 16 * j);
  for (int64_t k0 = 0; k0 < p.depth; k0 += kDepth) {
    const int64_t depth = std::min(kDepth, p.depth - k0);
    PackPanel(p, item, k0, depth, n0, width, scratch.packed);
    for (int64_t m = 0; m < count; m += kTileRows) {
      TileOf<kTileRows>(std::min(kTileRows, count - m), scratch.x_rows + m, k0,
                        scratch.packed, depth, scratch.sums + m * kPanel, k0 == 0);
    }
  }
  for (int64_t m = 0; m < count; ++m) {
    const int64_t a = item.row_begin + m;
    const float* sums = scratch.sums + m * kPanel;
    if (p.targets == nullptr) {
      for (int64_t j = 0; j < 3; ++j) {
        _mm512_mask_storeu_ps(p.out + a * p.cols + n0 + 16 * j, masks[j],
                              _mm512_load_ps(sums + 16 * j));
      }
      continue;
    }
    float* out = p.out + static_cast<int64_t>(p.targets[a]) * p.cols + n0;
    const __m512 scale = _mm512_set1_ps(p.row_scales ? p.row_scales[a] : 1.0f);
    for (int64_t j = 0; j < 3; ++j) {
      const __m512 added = _mm512_fmadd_ps(scale, _mm512_load_ps(sums + 16 * j),
                                           _mm512_maskz_loadu_ps(masks[j], out + 16 * j));
      _mm512_mask_storeu_ps(out + 16 * j, masks[j], added);
    }
  }
}

// Each few-row chunk's rows: the sum of its pieces' partial sums (items 0 ..
// per_chunk - 1 are the first chunk's pieces, and so on), to their output rows.
void AddPieces(const Problem& p, const std::vector<Item>& items, int64_t per_chunk) {
  if (per_chunk == 0) {
    return;
  }
  const int64_t stride = Stride(p.cols);
  for (size_t i = 0; i + per_chunk <= items.size() && items[i].partial >= 0; i += per_chunk) {
    const Item& chunk = items[i];
    for (int64_t m = 0; m < chunk.row_end - chunk.row_begin; ++m) {
      const int64_t a = chunk.row_begin + m;
      float* out = p.out + (p.targets ? static_cast<int64_t>(p.targets[a]) : a) * p.cols;
      const __m512 row_scale = _mm512_set1_ps(p.row_scales ? p.row_scales[a] : 1.0f);
      for (int64_t j = 0; j < stride / 16; ++j) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t piece = 0; piece < per_chunk; ++piece) {
          sum = _mm512_add_ps(sum, _mm512_load_ps(p.partials + items[i + piece].partial +
                                                  m * stride + 16 * j));
        }
        const __mmask16 mask = Mask(p.cols - 16 * j);
        _mm512_mask_storeu_ps(out + 16 * j, mask,
                              p.targets ? _mm512_fmadd_ps(row_scale, sum,
                                                          _mm512_maskz_loadu_ps(mask, out + 16 * j))
                                        : sum);
      }
    }
  }
}

// The units shared by the caller and its tasks. A task that starts after the
// last unit was taken finds none and touches no buffer, so the caller may
// return once every unit is done, whether or not all its tasks have run.
struct Work {
  Problem problem;
  AlignedFloats partials;  // the few-row pieces' sums (problem.partials)
  std::vector<Item> items;
  std::vector<int64_t> unit_begin;  // unit u is items unit_begin[u] .. unit_begin[u + 1]
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  int64_t units() const { return static_cast<int64_t>(unit_begin.size()) - 1; }

  void Drain() {
    static thread_local std::unique_ptr<Scratch> scratch = std::make_unique<Scratch>();
    for (int64_t unit; (unit = next.fetch_add(1, std::memory_order_relaxed)) < units();) {
      for (int64_t i = unit_begin[unit]; i < unit_begin[unit + 1]; ++i) {
        RunItem(problem, items[i], *scratch);
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error GroupedInt8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::S8> weight, ffi::AnyBuffer scales,
                             ffi::Buffer<ffi::S32> group_sizes, ffi::Buffer<ffi::S32> first,
                             ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> targets,
                             ffi::Buffer<ffi::F32> row_scales, int32_t mode,
                             ffi::ResultBuffer<ffi::F32> out) {
  const auto x_dims = x.dimensions();
  const auto w_dims = weight.dimensions();
  const auto s_dims = scales.dimensions();
  const auto out_dims = out->dimensions();
  if (x_dims.size() != 2 || w_dims.size() < 2 || s_dims.size() != w_dims.size() ||
      out_dims.size() != 2 || group_sizes.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument(
        "grouped_int8_matmul: x [T, K], weight [S..., K, N], scales [S..., R, N], "
        "group_sizes [G], out [A, N]");
  }
  const int64_t rank = w_dims.size();
  int64_t stack = 1;
  for (int64_t d = 0; d + 2 < rank; ++d) {
    if (s_dims[d] != w_dims[d]) {
      return ffi::Error::InvalidArgument("grouped_int8_matmul: scales and weight stacks differ");
    }
    stack *= w_dims[d];
  }
  const bool float_scales = scales.element_type() == ffi::DataType::F32;
  if (!float_scales && scales.element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("grouped_int8_matmul: scales must be bfloat16 or float32");
  }
  const int64_t depth = x_dims[1], cols = w_dims[rank - 1], blocks = s_dims[rank - 2];
  const bool gather = mode & kGather, scatter = mode & kScatter;
  const int64_t sorted_rows = gather ? rows.element_count()
                              : scatter ? targets.element_count()
                                        : out_dims[0];
  if (w_dims[rank - 2] != depth || s_dims[rank - 1] != cols || out_dims[1] != cols ||
      blocks < 1 || depth % blocks != 0 || first.element_count() != 1 ||
      (mode & ~(kGather | kScatter | kRowScales)) != 0 ||
      (gather ? sorted_rows > 0 && x_dims[0] == 0
              : rows.element_count() != 0 || x_dims[0] < sorted_rows) ||
      (scatter ? targets.element_count() != sorted_rows
               : targets.element_count() != 0 || out_dims[0] != sorted_rows) ||
      row_scales.element_count() != ((mode & kRowScales) ? sorted_rows : 0)) {
    return ffi::Error::InvalidArgument("grouped_int8_matmul: mismatched shapes");
  }
  auto work = std::make_shared<Work>();
  Problem& p = work->problem;
  p = Problem{x.typed_data(), x_dims[0], weight.typed_data(), scales.untyped_data(),
              float_scales,
              gather ? rows.typed_data() : nullptr,
              scatter ? targets.typed_data() : nullptr,
              (mode & kRowScales) ? row_scales.typed_data() : nullptr,
              out->typed_data(), depth, cols, blocks};
  if (scatter) {
    for (int64_t a = 0; a < sorted_rows; ++a) {
      if (p.targets[a] < 0 || p.targets[a] >= out_dims[0]) {
        return ffi::Error::InvalidArgument("grouped_int8_matmul: a target row out of range");
      }
    }
  }
  // The row chunks of the groups. Groups past the stack's end or past the rows
  // are cut off.
  std::vector<Item> chunks;
  const int32_t* sizes = group_sizes.typed_data();
  const int64_t groups = group_sizes.dimensions()[0];
  int64_t row = 0;
  for (int64_t g = 0; g < groups && row < sorted_rows; ++g) {
    const int64_t entry = static_cast<int64_t>(first.typed_data()[0]) + g;
    if (entry < 0 || entry >= stack) {
      break;
    }
    const int64_t end = std::min(sorted_rows, row + std::max<int64_t>(sizes[g], 0));
    for (int64_t begin = row; begin < end; begin += kRowChunk) {
      chunks.push_back(Item{entry, begin, std::min(end, begin + kRowChunk), 0});
    }
    row = end;
  }
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  // Chunks of few rows are cut in depth into pieces, each a unit of its own
  // summing into its own partial sums, which the caller adds up at the end:
  // enough pieces to give every thread two, each of kMinPieceRows rows or more.
  int64_t few = 0;
  for (const Item& chunk : chunks) few += chunk.row_end - chunk.row_begin <= kFewRows;
  const int64_t per_chunk =
      few == 0 ? 0
               : std::clamp<int64_t>((2 * threads + few - 1) / few, 1,
                                     std::max<int64_t>(depth / kMinPieceRows, 1));
  int64_t partial_size = 0;
  for (const Item& chunk : chunks) {
    if (chunk.row_end - chunk.row_begin > kFewRows) continue;
    for (int64_t piece = 0; piece < per_chunk; ++piece) {
      Item item = chunk;
      item.k_begin = piece * depth / per_chunk;
      item.k_end = (piece + 1) * depth / per_chunk;
      item.partial = partial_size;
      partial_size += (chunk.row_end - chunk.row_begin) * Stride(cols);
      work->unit_begin.push_back(work->items.size());
      work->items.push_back(item);
    }
  }
  if (partial_size > 0) {
    work->partials = NewAligned(partial_size);
    p.partials = work->partials.get();
  }
  // The other chunks' items chunk by chunk, each chunk's panels in a row (its rows
  // of x stay in cache). Without targets a unit is an item; with targets a unit
  // is one of `threads` ranges of panels, so that no two threads add to one output
  // element (more, smaller ranges re-read x more often and measured slower).
  const int64_t panels = (cols + kPanel - 1) / kPanel;
  const int64_t ranges = scatter ? std::min(panels, threads) : 1;
  for (int64_t range = 0; range < ranges; ++range) {
    const int64_t panel_begin = range * panels / ranges;
    const int64_t panel_end = (range + 1) * panels / ranges;
    if (scatter) {
      work->unit_begin.push_back(work->items.size());
    }
    for (const Item& chunk : chunks) {
      if (chunk.row_end - chunk.row_begin <= kFewRows) continue;
      for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
        if (!scatter) {
          work->unit_begin.push_back(work->items.size());
        }
        work->items.push_back(Item{chunk.entry, chunk.row_begin, chunk.row_end, panel});
      }
    }
  }
  work->unit_begin.push_back(work->items.size());
  if (scatter || depth == 0) {  // with K = 0 every product is 0
    std::fill(p.out, p.out + out_dims[0] * cols, 0.0f);
    if (depth == 0) {
      return ffi::Error::Success();
    }
  } else {
    std::fill(p.out + row * cols, p.out + sorted_rows * cols, 0.0f);  // rows of no group
  }
  // The caller works too: as many threads in all as the pool has.
  const int64_t helpers = std::min<int64_t>(threads - 1, work->units() - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([work] { work->Drain(); });
  }
  work->Drain();
  // The last units are in the helpers' hands: spin briefly, then give up the core
  // (with more devices than cores, the helper may be waiting for it).
  for (int64_t spins = 0; work->done.load(std::memory_order_acquire) < work->units(); ++spins) {
    if (spins < kSpins) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
  AddPieces(p, work->items, per_chunk);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokMoeGroupedInt8Matmul, GroupedInt8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [T, K]
                                  .Arg<ffi::Buffer<ffi::S8>>()    // weight [S, K, N]
                                  .Arg<ffi::AnyBuffer>()          // scales [S, R, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // group_sizes [G]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // first []
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows [A] or [0]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // targets [A] or [0]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // row_scales [A] or [0]
                                  .Attr<int32_t>("mode")          // kGather | kScatter | ...
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [A, N] or [T', N]
