// CPU implementations of the sepconv_cpp::forward / sepconv_cpp::backward ops, and of
// sepconv_cpp::max_pool2d_add (see pool_kernels.h), batch_norm and conv2d (a dense convolution through
// the forward's tiled GEMM).
//
// The schemas are defined in Python (kernels/ops.py); this file only registers kernels:
//   forward(input (N, C, H, W), depthwise_weight (C*M, 1, kh, kw), pointwise_weight (Cout, C*M, 1, 1),
//           depthwise_bias (C*M)?, pointwise_bias (Cout)?, stride[2], padding[4] (top, bottom, left,
//           right), dilation[2], relu_input) -> (N, Cout, OH, OW)
//   forward_packed(input, depthwise_weight, pointwise_weight, packed_pointwise, ...): forward, with the pointwise
//           weight also as pack_pointwise(pointwise_weight) returned it (not packed again)
//   backward(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias?, stride, padding,
//            dilation, relu_input, output_mask[5]) -> 5 gradients ((0,) where not asked for; the mask has
//            one flag per gradient, in the order they are returned)
// Outputs follow the memory format rule of kernels._args.memory_format_of. The kernels run on
// NHWC buffers; any other input layout is converted once on the way in and out.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>

#include "batch_norm_kernels.h"
#include "buffer_cache.h"
#include "pool_kernels.h"
#include "sepconv_kernels.h"

namespace sepconv {
namespace {

// Mirrors kernels._args.memory_format_of.
at::MemoryFormat memory_format_of(const at::Tensor& t) {
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  return t.stride(1) < t.stride(3) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

int64_t out_size(int64_t size, int64_t before, int64_t after, int64_t kernel, int64_t stride, int64_t dilation) {
  const int64_t span = size + before + after - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// A window of kh x kw taps, each at least 1, with strides and dilations of at least 1 and no negative
// padding: the ops are public (torch.ops.sepconv_cpp), and a zero stride divides by zero.
void check_window(const char* op, int64_t kh, int64_t kw, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation) {
  TORCH_CHECK(kh >= 1 && kw >= 1, op, ": the kernel must be at least 1x1, got ", kh, "x", kw);
  TORCH_CHECK(*std::min_element(stride.begin(), stride.end()) >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(*std::min_element(dilation.begin(), dilation.end()) >= 1, op, ": dilation must be >= 1, got ",
              dilation);
  TORCH_CHECK(*std::min_element(padding.begin(), padding.end()) >= 0, op, ": padding must be >= 0, got ", padding);
}

void check_args(const at::Tensor& input, const at::Tensor& dw, const at::Tensor& pw, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(input.dim() == 4, "sepconv_cpp: input must be 4-D (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK(input.device().is_cpu(), "sepconv_cpp: input must be a CPU tensor, got device ", input.device());
  TORCH_CHECK(dw.dim() == 4 && dw.size(1) == 1 && dw.size(0) % std::max<int64_t>(input.size(1), 1) == 0,
              "sepconv_cpp: depthwise_weight must be (C*M, 1, kh, kw) with C = ", input.size(1), ", got ",
              dw.sizes());
  TORCH_CHECK(pw.dim() == 4 && pw.size(1) == dw.size(0) && pw.size(2) == 1 && pw.size(3) == 1,
              "sepconv_cpp: pointwise_weight must be (Cout, ", dw.size(0), ", 1, 1), got ", pw.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 4 && dilation.size() == 2,
              "sepconv_cpp: expected stride[2], padding[4], dilation[2], got ", stride, ", ", padding, ", ",
              dilation);
  check_window("sepconv_cpp", dw.size(2), dw.size(3), stride, padding, dilation);
  TORCH_CHECK(dw.scalar_type() == input.scalar_type() && pw.scalar_type() == input.scalar_type(),
              "sepconv_cpp: weights must have the input's dtype ", input.scalar_type());
}

// The geometry of a (kh x kw) window over `input` (N, C, H, W) with CM channels per input pixel (C times
// the depth multiplier) and Cout outputs; padding (top, bottom, left, right).
Geometry window_geometry(const at::Tensor& input, int64_t CM, int64_t Cout, int64_t kh, int64_t kw,
                         at::IntArrayRef stride, std::array<int64_t, 4> padding, at::IntArrayRef dilation) {
  Geometry g;
  g.N = input.size(0);
  g.H = input.size(2);
  g.W = input.size(3);
  g.CM = CM;
  g.Cout = Cout;
  g.kh = kh;
  g.kw = kw;
  g.sh = stride[0];
  g.sw = stride[1];
  g.pt = padding[0];
  g.pl = padding[2];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.OH = out_size(g.H, padding[0], padding[1], g.kh, g.sh, g.dh);
  g.OW = out_size(g.W, padding[2], padding[3], g.kw, g.sw, g.dw);
  return g;
}

Geometry geometry(const at::Tensor& input, const at::Tensor& dw, const at::Tensor& pw, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  return window_geometry(input, dw.size(0), pw.size(0), dw.size(2), dw.size(3), stride,
                         {padding[0], padding[1], padding[2], padding[3]}, dilation);
}

// A buffer for a large result or copy, recycled through BufferCache (see buffer_cache.h).
at::Tensor empty_buffer(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  return BufferCache::instance().empty(sizes, options, format);
}

// (N, C, H, W) -> dense (N, H, W, C*M): channel c*M+m is a copy of channel c.
at::Tensor to_nhwc(const at::Tensor& input, int64_t multiplier) {
  at::Tensor nhwc = input.permute({0, 2, 3, 1});
  if (multiplier == 1 && nhwc.is_contiguous()) return nhwc;
  if (multiplier > 1) nhwc = nhwc.unsqueeze(4).expand({-1, -1, -1, -1, multiplier});
  at::Tensor dense = empty_buffer({input.size(0), input.size(2), input.size(3), input.size(1) * multiplier},
                                  input.options());
  dense.view(nhwc.sizes()).copy_(nhwc);
  return dense;
}

// The dense (N, H, W, K) buffer a kernel writes the result `out` (N, K, H, W) through: out itself
// when channels_last, otherwise a scratch buffer that copy_into_output moves into out afterwards.
at::Tensor nhwc_target(const at::Tensor& out, at::MemoryFormat format) {
  if (format == at::MemoryFormat::ChannelsLast) return out;
  return empty_buffer({out.size(0), out.size(2), out.size(3), out.size(1)}, out.options());
}

void copy_into_output(at::Tensor& out, const at::Tensor& result) {
  if (!result.is_same(out)) out.copy_(result.permute({0, 3, 1, 2}));
}

// A result of logical shape `sizes` (N, K, H, W) in `like`'s memory format, which `fill` computes into
// the dense NHWC buffer it is given (the result itself when channels_last). Empty results skip `fill`.
template <typename Fill>
at::Tensor nhwc_result(const at::Tensor& like, at::IntArrayRef sizes, Fill fill) {
  const at::MemoryFormat format = memory_format_of(like);
  at::Tensor out = empty_buffer(sizes, like.options(), format);
  if (out.numel() == 0) return out;
  at::Tensor result = nhwc_target(out, format);
  fill(result);
  copy_into_output(out, result);
  return out;
}

// The per-channel map a BatchNorm folded into the input read applies (scale and shift tensors of the input's
// dtype; null: none).
template <typename T>
InputAffine<T> input_affine(const at::Tensor* scale, const at::Tensor* shift) {
  if (scale == nullptr) return {};
  return {scale->data_ptr<T>(), shift->data_ptr<T>()};
}

// The forward's work. With moments, that tensor becomes the output's per-channel moments: (2, Cout)
// float64, the mean in row 0 and the sum of squared deviations from it (M2) in row 1, for the
// batch_norm op after the layer (forward_with_moments).
// With packed, pointwise_weight as pack_pointwise returned it, read instead of packing the weight again.
at::Tensor run_forward(const char* op, const at::Tensor& input, const at::Tensor& depthwise_weight,
                       const at::Tensor& pointwise_weight, const std::optional<at::Tensor>& depthwise_bias,
                       const std::optional<at::Tensor>& pointwise_bias, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, bool relu_input, at::Tensor* moments,
                       const at::Tensor* packed = nullptr, const at::Tensor* input_scale = nullptr,
                       const at::Tensor* input_shift = nullptr) {
  check_args(input, depthwise_weight, pointwise_weight, stride, padding, dilation);
  const Geometry g = geometry(input, depthwise_weight, pointwise_weight, stride, padding, dilation);
  if (packed != nullptr) {
    const int64_t size = packed_pointwise_size(g.Cout, g.CM);
    TORCH_CHECK(packed->dim() == 1 && packed->numel() == size && packed->scalar_type() == input.scalar_type() &&
                    packed->device().is_cpu() && packed->is_contiguous(),
                op, ": packed_pointwise must be what sepconv_cpp::pack_pointwise returns for a (", g.Cout, ", ",
                g.CM, ", 1, 1) ", input.scalar_type(), " weight: a contiguous 1-D CPU tensor of ", size,
                " elements, got ", packed->scalar_type(), " ", packed->sizes(), " on ", packed->device());
  }
  std::optional<OutputMoments> sink;
  if (moments != nullptr) {
    TORCH_CHECK(g.pixels() > 0, op, ": needs at least one output pixel, got input ", input.sizes());
    *moments = at::empty({2, g.Cout}, input.options().dtype(at::kDouble));
    sink = OutputMoments{moments->data_ptr<double>(), moments->data_ptr<double>() + g.Cout};
  }
  return nhwc_result(input, {g.N, g.Cout, g.OH, g.OW}, [&](at::Tensor& result) {
    const int64_t multiplier = g.CM / input.size(1);
    const at::Tensor x = to_nhwc(input, multiplier);
    const at::Tensor pw2d = pointwise_weight.reshape({g.Cout, g.CM}).contiguous();
    const at::Tensor dw_taps = depthwise_weight.reshape({g.CM, g.kh * g.kw}).t().contiguous();
    std::optional<at::Tensor> bias;  // pw_bias + pw @ dw_bias
    if (depthwise_bias.has_value()) bias = at::mv(pw2d, *depthwise_bias);
    if (pointwise_bias.has_value()) bias = bias.has_value() ? *bias + *pointwise_bias : pointwise_bias->contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sepconv_cpp_forward", [&] {
      sepconv::forward<scalar_t>(g, x.data_ptr<scalar_t>(), dw_taps.data_ptr<scalar_t>(), pw2d.data_ptr<scalar_t>(),
                                 bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, relu_input,
                                 result.data_ptr<scalar_t>(), sink ? &*sink : nullptr,
                                 packed != nullptr ? packed->data_ptr<scalar_t>() : nullptr,
                                 input_affine<scalar_t>(input_scale, input_shift));
    });
  });
}

at::Tensor forward_op(const at::Tensor& input, const at::Tensor& depthwise_weight, const at::Tensor& pointwise_weight,
                      const std::optional<at::Tensor>& depthwise_bias, const std::optional<at::Tensor>& pointwise_bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu_input) {
  return run_forward("sepconv_cpp::forward", input, depthwise_weight, pointwise_weight, depthwise_bias,
                     pointwise_bias, stride, padding, dilation, relu_input, nullptr);
}

// forward with the pointwise weight also given packed (pack_pointwise), for a weight that serves many calls.
at::Tensor forward_packed_op(const at::Tensor& input, const at::Tensor& depthwise_weight,
                             const at::Tensor& pointwise_weight, const at::Tensor& packed_pointwise,
                             const std::optional<at::Tensor>& depthwise_bias,
                             const std::optional<at::Tensor>& pointwise_bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool relu_input) {
  return run_forward("sepconv_cpp::forward_packed", input, depthwise_weight, pointwise_weight, depthwise_bias,
                     pointwise_bias, stride, padding, dilation, relu_input, nullptr, &packed_pointwise);
}

// pointwise_weight (Cout, K, 1, 1) in the panel layout this build's forward reads (its ISA's pass width).
at::Tensor pack_pointwise_op(const at::Tensor& pointwise_weight) {
  TORCH_CHECK(pointwise_weight.dim() == 4 && pointwise_weight.size(2) == 1 && pointwise_weight.size(3) == 1 &&
                  pointwise_weight.device().is_cpu() && pointwise_weight.is_floating_point(),
              "sepconv_cpp::pack_pointwise: pointwise_weight must be a (Cout, K, 1, 1) floating-point CPU tensor, got ",
              pointwise_weight.scalar_type(), " ", pointwise_weight.sizes(), " on ", pointwise_weight.device());
  const int64_t Cout = pointwise_weight.size(0), K = pointwise_weight.size(1);
  const at::Tensor pw2d = pointwise_weight.reshape({Cout, K}).contiguous();
  at::Tensor packed = at::empty({packed_pointwise_size(Cout, K)}, pointwise_weight.options());
  AT_DISPATCH_FLOATING_TYPES(pointwise_weight.scalar_type(), "sepconv_cpp_pack_pointwise", [&] {
    pack_pointwise<scalar_t>(pw2d.data_ptr<scalar_t>(), Cout, K, packed.data_ptr<scalar_t>());
  });
  return packed;
}

std::tuple<at::Tensor, at::Tensor> forward_with_moments_op(
    const at::Tensor& input, const at::Tensor& depthwise_weight, const at::Tensor& pointwise_weight,
    const std::optional<at::Tensor>& depthwise_bias, const std::optional<at::Tensor>& pointwise_bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu_input) {
  at::Tensor moments;
  at::Tensor out = run_forward("sepconv_cpp::forward_with_moments", input, depthwise_weight, pointwise_weight,
                               depthwise_bias, pointwise_bias, stride, padding, dilation, relu_input, &moments);
  return {out, moments};
}

// A dense convolution (groups 1) through the forward's tiled GEMM: each block of output pixels' input
// windows (taps x input channels) is gathered into an L2-resident tile and multiplied by the weight.
at::Tensor conv2d_op(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(input.dim() == 4, "sepconv_cpp.conv2d: input must be 4-D (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK(input.device().is_cpu(), "sepconv_cpp.conv2d: input must be a CPU tensor, got device ", input.device());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == input.size(1),
              "sepconv_cpp.conv2d: weight must be (Cout, ", input.size(1), ", kh, kw), got ", weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "sepconv_cpp.conv2d: expected stride[2], padding[2], dilation[2], got ", stride, ", ", padding, ", ",
              dilation);
  check_window("sepconv_cpp.conv2d", weight.size(2), weight.size(3), stride, padding, dilation);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() &&
                  (!bias.has_value() || bias->scalar_type() == input.scalar_type()),
              "sepconv_cpp.conv2d: weight and bias must have the input's dtype ", input.scalar_type());
  const Geometry g = window_geometry(input, input.size(1), weight.size(0), weight.size(2), weight.size(3), stride,
                                     {padding[0], padding[0], padding[1], padding[1]}, dilation);
  return nhwc_result(input, {g.N, g.Cout, g.OH, g.OW}, [&](at::Tensor& result) {
    const at::Tensor x = to_nhwc(input, 1);
    const at::Tensor w = weight.permute({0, 2, 3, 1}).reshape({g.Cout, g.kh * g.kw * g.CM}).contiguous();
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sepconv_cpp_conv2d", [&] {
      sepconv::conv_forward<scalar_t>(g, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                      b.defined() ? b.data_ptr<scalar_t>() : nullptr, result.data_ptr<scalar_t>());
    });
  });
}

// The backward's work. With input_scale and input_shift (per input channel, depth multiplier 1), the layer's
// input is relu?(input * scale + shift) as in run_forward's, and the input gradient is the one reaching
// input * scale + shift.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& depthwise_weight,
    const at::Tensor& pointwise_weight, const std::optional<at::Tensor>& depthwise_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool relu_input, std::array<bool, 5> output_mask,
    const at::Tensor* input_scale = nullptr, const at::Tensor* input_shift = nullptr,
    const at::Tensor* sums_mean = nullptr, at::Tensor* grad_sums = nullptr) {
  check_args(input, depthwise_weight, pointwise_weight, stride, padding, dilation);
  const Geometry g = geometry(input, depthwise_weight, pointwise_weight, stride, padding, dilation);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.N && grad_output.size(1) == g.Cout &&
                  grad_output.size(2) == g.OH && grad_output.size(3) == g.OW,
              "sepconv_cpp: grad_output must have shape (", g.N, ", ", g.Cout, ", ", g.OH, ", ", g.OW, "), got ",
              grad_output.sizes());
  const auto [want_input, want_dw_weight, want_pointwise, want_dw_bias, want_pw_bias] = output_mask;
  // The depthwise weight and bias gradients come from one reduction; the pointwise bias's is its own sum.
  const bool want_depthwise = want_dw_weight || want_dw_bias;
  const at::TensorOptions options = input.options();
  const int64_t taps = g.kh * g.kw;
  const int64_t channels = input.size(1), multiplier = g.CM / std::max<int64_t>(channels, 1);

  const at::Tensor x = to_nhwc(input, multiplier);
  const at::Tensor go = to_nhwc(grad_output, 1);
  const at::Tensor pw2d = pointwise_weight.reshape({g.Cout, g.CM}).contiguous();
  const at::Tensor dw_taps = depthwise_weight.reshape({g.CM, taps}).t().contiguous();
  const at::Tensor dw_bias = depthwise_bias.has_value() ? depthwise_bias->contiguous() : at::Tensor();

  // Every element of these is written by sepconv::backward. grad_input and grad_pw are returned as
  // allocated, never as views of a temporary: autograd adds a second gradient into a tensor in
  // place only when it holds the tensor's storage alone, and a view keeps its base alive (the
  // entry block's two input gradients at 147x147, batch 8, took a 61 ms out-of-place add).
  const at::MemoryFormat format = memory_format_of(input);
  const bool direct_input = want_input && multiplier == 1;
  at::Tensor grad_input = direct_input ? empty_buffer(input.sizes(), options, format) : at::Tensor();
  at::Tensor grad_x = direct_input ? nhwc_target(grad_input, format)
                      : want_input ? empty_buffer({g.N, g.H, g.W, g.CM}, options)
                                   : at::Tensor();
  at::Tensor grad_dw_taps = want_depthwise ? at::empty({taps, g.CM}, options) : at::Tensor();
  at::Tensor grad_dw_bias = want_depthwise ? at::empty({g.CM}, options) : at::Tensor();
  at::Tensor grad_pw = want_pointwise ? empty_buffer(pointwise_weight.sizes(), options) : at::Tensor();
  at::Tensor grad_pw_bias = want_pw_bias ? at::empty({g.Cout}, options) : at::Tensor();

  if (want_input || want_depthwise || want_pointwise || want_pw_bias) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sepconv_cpp_backward", [&] {
      auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
      const InputAffine<scalar_t> affine = input_affine<scalar_t>(input_scale, input_shift);
      InputGradSums<scalar_t> sums;
      if (sums_mean != nullptr && multiplier == 1) {
        *grad_sums = at::empty({2, g.CM}, options.dtype(at::kDouble));
        sums = {sums_mean->data_ptr<scalar_t>(), grad_sums->data_ptr<double>()};
      }
      sepconv::backward<scalar_t>(g, ptr(x), ptr(dw_taps), ptr(dw_bias), ptr(pw2d), ptr(go), relu_input,
                                  BackwardOutputs{want_input, want_depthwise, want_pointwise, want_pw_bias}, ptr(grad_x),
                                  ptr(grad_dw_taps), ptr(grad_dw_bias), ptr(grad_pw), ptr(grad_pw_bias), affine,
                                  &sums);
      if (grad_sums != nullptr && !sums.taken) *grad_sums = at::Tensor();
    });
  }

  // A fresh (0,) tensor for each gradient not asked for (outputs must not alias).
  auto none = [&] { return at::empty({0}, options); };
  if (direct_input) {
    copy_into_output(grad_input, grad_x);
  } else if (want_input) {  // the M copies of each input channel add up
    grad_input = empty_buffer(input.sizes(), options, format);
    at::Tensor nhwc = grad_input.permute({0, 2, 3, 1});
    at::sum_out(nhwc, grad_x.view({g.N, g.H, g.W, channels, multiplier}), 4);
  } else {
    grad_input = none();
  }
  return {
      grad_input,
      want_dw_weight ? grad_dw_taps.t().reshape(depthwise_weight.sizes()).contiguous() : none(),
      want_pointwise ? grad_pw : none(),
      want_dw_bias ? grad_dw_bias : none(),
      want_pw_bias ? grad_pw_bias : none(),
  };
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& depthwise_weight,
    const at::Tensor& pointwise_weight, const std::optional<at::Tensor>& depthwise_bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool relu_input, std::array<bool, 5> output_mask) {
  return run_backward(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias, stride, padding,
                      dilation, relu_input, output_mask);
}

// The input of the pool and BatchNorm ops.
void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 4 && input.device().is_cpu() && input.is_floating_point(), op,
              ": input must be a 4-D floating-point CPU tensor, got ", input.sizes(), " ", input.scalar_type(),
              " on ", input.device());
}

PoolGeometry pool_geometry(const char* op, const at::Tensor& input, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding) {
  check_input(op, input);
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": expected kernel_size[2], stride[2], padding[2], got ", kernel_size, ", ", stride, ", ", padding);
  PoolGeometry g{input.size(0), input.size(2), input.size(3), input.size(1), 0, 0,
                 kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1]};
  TORCH_CHECK(g.kh > 0 && g.kw > 0 && g.sh > 0 && g.sw > 0 && g.ph >= 0 && g.pw >= 0 && 2 * g.ph <= g.kh &&
                  2 * g.pw <= g.kw,
              op, ": needs kernel_size, stride > 0 and 0 <= padding <= kernel_size / 2, got kernel_size=",
              kernel_size, ", stride=", stride, ", padding=", padding);
  g.OH = out_size(g.H, g.ph, g.ph, g.kh, g.sh, 1);
  g.OW = out_size(g.W, g.pw, g.pw, g.kw, g.sw, 1);
  return g;
}

// `name` must be a CPU tensor of input's dtype with the pooled shape.
void check_pooled(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input,
                  const PoolGeometry& g) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == g.N && t.size(1) == g.C && t.size(2) == g.OH && t.size(3) == g.OW &&
                  t.scalar_type() == input.scalar_type() && t.device().is_cpu(),
              op, ": ", name, " must be a ", input.scalar_type(), " CPU tensor of shape (", g.N, ", ", g.C, ", ",
              g.OH, ", ", g.OW, "), got ", t.scalar_type(), " ", t.sizes());
}

at::Tensor max_pool2d_add_op(const at::Tensor& input, const at::Tensor& residual, at::IntArrayRef kernel_size,
                             at::IntArrayRef stride, at::IntArrayRef padding) {
  constexpr const char* kOp = "sepconv_cpp::max_pool2d_add";
  const PoolGeometry g = pool_geometry(kOp, input, kernel_size, stride, padding);
  check_pooled(kOp, "residual", residual, input, g);
  return nhwc_result(input, {g.N, g.C, g.OH, g.OW}, [&](at::Tensor& result) {
    const at::Tensor x = to_nhwc(input, 1), r = to_nhwc(residual, 1);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sepconv_cpp_max_pool2d_add", [&] {
      max_pool_add<scalar_t>(g, x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), result.data_ptr<scalar_t>());
    });
  });
}

at::Tensor max_pool2d_add_backward_op(const at::Tensor& grad_output, const at::Tensor& input,
                                      at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  constexpr const char* kOp = "sepconv_cpp::max_pool2d_add_backward";
  const PoolGeometry g = pool_geometry(kOp, input, kernel_size, stride, padding);
  check_pooled(kOp, "grad_output", grad_output, input, g);
  return nhwc_result(input, input.sizes(), [&](at::Tensor& result) {
    const at::Tensor x = to_nhwc(input, 1), go = to_nhwc(grad_output, 1);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sepconv_cpp_max_pool2d_add_backward", [&] {
      max_pool_add_backward<scalar_t>(g, x.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(),
                                      result.data_ptr<scalar_t>());
    });
  });
}

void check_channel_vector(const char* op, const char* name, const std::optional<at::Tensor>& t,
                          const at::Tensor& input) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == input.size(1) && t->scalar_type() == input.scalar_type() &&
                  t->device().is_cpu(),
              op, ": ", name, " must be a 1-D ", input.scalar_type(), " CPU tensor of ",
              input.size(1), " elements, got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
}

// `name` must be a CPU tensor of input's dtype and shape.
void check_like_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.sizes() == input.sizes() && t.scalar_type() == input.scalar_type() && t.device().is_cpu(), op, ": ",
              name, " must be a ", input.scalar_type(), " CPU tensor of shape ", input.sizes(), ", got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// Given moments must be input's per-channel mean and M2 as forward_with_moments returns them.
void check_moments(const char* op, const std::optional<at::Tensor>& moments, int64_t C) {
  TORCH_CHECK(!moments.has_value() || (moments->dim() == 2 && moments->size(0) == 2 && moments->size(1) == C &&
                                       moments->scalar_type() == at::kDouble && moments->device().is_cpu()),
              op, ": moments must be a (2, ", C, ") float64 CPU tensor (input's per-channel mean and M2), got ",
              moments->sizes(), " ", moments->scalar_type());  // (only reached with moments given)
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_op(const at::Tensor& input,
                                                                         const std::optional<at::Tensor>& weight,
                                                                         const std::optional<at::Tensor>& bias,
                                                                         double eps, bool relu,
                                                                         const std::optional<at::Tensor>& moments) {
  constexpr const char* kOp = "sepconv_cpp::batch_norm";
  check_input(kOp, input);
  check_channel_vector(kOp, "weight", weight, input);
  check_channel_vector(kOp, "bias", bias, input);
  const int64_t C = input.size(1), M = input.size(0) * input.size(2) * input.size(3);
  TORCH_CHECK(M > 0, kOp, ": needs at least one value per channel, got input ", input.sizes());
  check_moments(kOp, moments, C);
  const at::Tensor given = moments.has_value() ? moments->contiguous() : at::Tensor();
  at::Tensor mean = at::empty({C}, input.options()), invstd = at::empty({C}, input.options()),
             var = at::empty({C}, input.options());
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = nhwc_result(input, input.sizes(), [&](at::Tensor& result) {
    const at::Tensor x = to_nhwc(input, 1);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sepconv_cpp_batch_norm", [&] {
      batch_norm_forward<scalar_t>(M, C, x.data_ptr<scalar_t>(), data_or_null<scalar_t>(w),
                                   data_or_null<scalar_t>(b), eps, relu, result.data_ptr<scalar_t>(),
                                   mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(),
                                   given.defined() ? given.data_ptr<double>() : nullptr);
    });
  });
  return {out, mean, invstd, var};
}

// batch_norm_backward_op's work, after its checks. sums: the backward's two sums per channel (2 x C doubles,
// batch_norm_backward_from_sums) where the caller already took them, else null (taken here). in_place: grad_input
// is written over grad_output, a buffer of the caller's laid out as input (each row is read before it is written).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, std::array<bool, 3> output_mask,
    const std::optional<at::Tensor>& output, const at::Tensor* sums = nullptr, bool in_place = false) {
  const int64_t C = input.size(1), M = input.size(0) * input.size(2) * input.size(3);
  const auto [want_input, want_weight, want_bias] = output_mask;
  const at::MemoryFormat format = memory_format_of(input);
  auto none = [&] { return at::empty({0}, input.options()); };
  at::Tensor grad_input = !want_input ? none()
                          : in_place  ? grad_output
                                      : empty_buffer(input.sizes(), input.options(), format);
  at::Tensor grad_weight = want_weight ? at::empty({C}, input.options()) : none();
  at::Tensor grad_bias = want_bias ? at::empty({C}, input.options()) : none();
  if (M == 0 || C == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor x = to_nhwc(input, 1), dy = to_nhwc(grad_output, 1);
  const at::Tensor y = output.has_value() ? to_nhwc(*output, 1) : at::Tensor();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor m = mean.contiguous(), s = invstd.contiguous();
  at::Tensor result = want_input ? nhwc_target(grad_input, format) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sepconv_cpp_batch_norm_backward", [&] {
    scalar_t* gi = want_input ? result.data_ptr<scalar_t>() : nullptr;
    scalar_t* gw = want_weight ? grad_weight.data_ptr<scalar_t>() : nullptr;
    scalar_t* gb = want_bias ? grad_bias.data_ptr<scalar_t>() : nullptr;
    if (sums != nullptr) {
      batch_norm_backward_from_sums<scalar_t>(M, C, sums->data_ptr<double>(), dy.data_ptr<scalar_t>(),
                                              x.data_ptr<scalar_t>(), data_or_null<scalar_t>(w), m.data_ptr<scalar_t>(),
                                              s.data_ptr<scalar_t>(), data_or_null<scalar_t>(y), gi, gw, gb);
    } else {
      batch_norm_backward<scalar_t>(M, C, dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), data_or_null<scalar_t>(w),
                                    m.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), data_or_null<scalar_t>(y), gi, gw,
                                    gb);
    }
  });
  if (want_input) copy_into_output(grad_input, result);
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_op(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& invstd, std::array<bool, 3> output_mask,
    const std::optional<at::Tensor>& output) {
  constexpr const char* kOp = "sepconv_cpp::batch_norm_backward";
  check_input(kOp, input);
  check_like_input(kOp, "grad_output", grad_output, input);
  if (output.has_value()) check_like_input(kOp, "output", *output, input);
  check_channel_vector(kOp, "weight", weight, input);
  check_channel_vector(kOp, "mean", mean, input);
  check_channel_vector(kOp, "invstd", invstd, input);
  return run_batch_norm_backward(grad_output, input, weight, mean, invstd, output_mask, output);
}

// BatchNorm's alpha and beta (batch_norm_affine) for both batch_norm_separable ops: the forward's and the
// backward's input reads use the same values to the bit. weight, bias: contiguous or undefined.
std::pair<at::Tensor, at::Tensor> folded_affine(const at::Tensor& input, const at::Tensor& weight,
                                                const at::Tensor& bias, const at::Tensor& mean,
                                                const at::Tensor& invstd) {
  const int64_t C = input.size(1);
  at::Tensor alpha = at::empty({C}, input.options()), beta = at::empty({C}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sepconv_cpp_folded_affine", [&] {
    batch_norm_affine<scalar_t>(C, data_or_null<scalar_t>(weight), data_or_null<scalar_t>(bias),
                                mean.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
                                beta.data_ptr<scalar_t>());
  });
  return {alpha, beta};
}

// The checks of both batch_norm_separable ops: what their BatchNorm and separable parts check, and a depth
// multiplier of 1 (the affine map is per input channel).
void check_batch_norm_separable(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& bn_weight,
                                const std::optional<at::Tensor>& bn_bias, const at::Tensor& depthwise_weight,
                                const at::Tensor& pointwise_weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation) {
  check_input(op, input);
  check_args(input, depthwise_weight, pointwise_weight, stride, padding, dilation);
  check_channel_vector(op, "bn_weight", bn_weight, input);
  check_channel_vector(op, "bn_bias", bn_bias, input);
  TORCH_CHECK(depthwise_weight.size(0) == input.size(1), op, ": needs a depth multiplier of 1 (depthwise_weight of ",
              input.size(1), " channels), got depthwise_weight ", depthwise_weight.sizes());
  TORCH_CHECK(input.size(0) * input.size(2) * input.size(3) > 0, op,
              ": needs at least one value per channel, got input ", input.sizes());
}

// BatchNorm in training mode (batch statistics, from moments where given) folded into the separable
// convolution after it: out = forward(relu?(input * alpha + beta)) with BatchNorm's alpha and beta
// (batch_norm_affine), applied as the depthwise stage reads each input (InputAffine); the normalised
// input is never written. Returns out, out's moments ((2, Cout) float64, with with_moments; else (0,)),
// and BatchNorm's mean, invstd and unbiased variance.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_separable_op(
    const at::Tensor& input, const std::optional<at::Tensor>& moments, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, const at::Tensor& depthwise_weight,
    const at::Tensor& pointwise_weight, const std::optional<at::Tensor>& depthwise_bias,
    const std::optional<at::Tensor>& pointwise_bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool relu_input, bool with_moments) {
  constexpr const char* kOp = "sepconv_cpp::batch_norm_separable";
  check_batch_norm_separable(kOp, input, bn_weight, bn_bias, depthwise_weight, pointwise_weight, stride, padding,
                             dilation);
  const int64_t C = input.size(1), M = input.size(0) * input.size(2) * input.size(3);
  check_moments(kOp, moments, C);
  const at::Tensor w = bn_weight.has_value() ? bn_weight->contiguous() : at::Tensor();
  const at::Tensor b = bn_bias.has_value() ? bn_bias->contiguous() : at::Tensor();
  at::Tensor mean = at::empty({C}, input.options()), invstd = at::empty({C}, input.options()),
             var = at::empty({C}, input.options());
  at::Tensor stats = moments.has_value() ? moments->contiguous() : at::empty({2, C}, input.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sepconv_cpp_batch_norm_separable", [&] {
    if (!moments.has_value()) {
      const at::Tensor x = to_nhwc(input, 1);
      batch_norm_moments<scalar_t>(M, C, x.data_ptr<scalar_t>(), stats.data_ptr<double>());
    }
    batch_norm_stats<scalar_t>(M, C, stats.data_ptr<double>(), eps, mean.data_ptr<scalar_t>(),
                               invstd.data_ptr<scalar_t>(), var.data_ptr<scalar_t>());
  });
  const auto [alpha, beta] = folded_affine(input, w, b, mean, invstd);
  at::Tensor out_moments;
  at::Tensor out = run_forward(kOp, input, depthwise_weight, pointwise_weight, depthwise_bias, pointwise_bias, stride,
                               padding, dilation, relu_input, with_moments ? &out_moments : nullptr, nullptr, &alpha,
                               &beta);
  if (!with_moments) out_moments = at::empty({0}, input.options().dtype(at::kDouble));
  return {out, out_moments, mean, invstd, var};
}

// Gradients of batch_norm_separable, in the order input, bn_weight, bn_bias, depthwise_weight,
// pointwise_weight, depthwise_bias, pointwise_bias ((0,) where output_mask says not asked for). The
// separable backward reads input as the forward did, through BatchNorm's alpha and beta (the same values: the
// same function of mean, invstd, bn_weight and bn_bias, one fused multiply-add); BatchNorm's backward then
// takes the gradient that reaches the normalised input.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
batch_norm_separable_backward_op(const at::Tensor& grad_output, const at::Tensor& input,
                                 const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
                                 const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& depthwise_weight,
                                 const at::Tensor& pointwise_weight, const std::optional<at::Tensor>& depthwise_bias,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 bool relu_input, std::array<bool, 7> output_mask) {
  constexpr const char* kOp = "sepconv_cpp::batch_norm_separable_backward";
  check_batch_norm_separable(kOp, input, bn_weight, bn_bias, depthwise_weight, pointwise_weight, stride, padding,
                             dilation);
  check_channel_vector(kOp, "mean", mean, input);
  check_channel_vector(kOp, "invstd", invstd, input);
  const auto [want_input, want_bn_weight, want_bn_bias, want_dw_weight, want_pointwise, want_dw_bias, want_pw_bias] =
      output_mask;
  const bool want_normalized = want_input || want_bn_weight || want_bn_bias;
  const at::Tensor w = bn_weight.has_value() ? bn_weight->contiguous() : at::Tensor();
  const at::Tensor b = bn_bias.has_value() ? bn_bias->contiguous() : at::Tensor();
  const at::Tensor m = mean.contiguous(), s = invstd.contiguous();
  const auto [alpha, beta] = folded_affine(input, w, b, m, s);
  // BatchNorm's backward sums, taken by the separable backward as it finishes each row of the gradient
  // reaching the normalised input (InputGradSums; undefined where it could not).
  at::Tensor sums;
  auto [grad_normalized, grad_dw_weight, grad_pw, grad_dw_bias, grad_pw_bias] =
      run_backward(grad_output, input, depthwise_weight, pointwise_weight, depthwise_bias, stride, padding, dilation,
                   relu_input, {want_normalized, want_dw_weight, want_pointwise, want_dw_bias, want_pw_bias}, &alpha,
                   &beta, want_normalized ? &m : nullptr, &sums);
  auto none = [&] { return at::empty({0}, input.options()); };
  at::Tensor grad_input = none(), grad_bn_weight = none(), grad_bn_bias = none();
  if (want_normalized) {  // BatchNorm's backward, its input gradient written over grad_normalized (run_backward's
                          // buffer, laid out as input)
    std::tie(grad_input, grad_bn_weight, grad_bn_bias) =
        run_batch_norm_backward(grad_normalized, input, bn_weight, mean, invstd,
                                {want_input, want_bn_weight, want_bn_bias}, std::nullopt,
                                sums.defined() ? &sums : nullptr, true);
  }
  return {grad_input, grad_bn_weight, grad_bn_bias, grad_dw_weight, grad_pw, grad_dw_bias, grad_pw_bias};
}

}  // namespace
}  // namespace sepconv

TORCH_LIBRARY_IMPL(sepconv_cpp, CPU, m) {
  m.impl("forward", &sepconv::forward_op);
  m.impl("forward_with_moments", &sepconv::forward_with_moments_op);
  m.impl("forward_packed", &sepconv::forward_packed_op);
  m.impl("pack_pointwise", &sepconv::pack_pointwise_op);
  m.impl("conv2d", &sepconv::conv2d_op);
  m.impl("backward", &sepconv::backward_op);
  m.impl("max_pool2d_add", &sepconv::max_pool2d_add_op);
  m.impl("max_pool2d_add_backward", &sepconv::max_pool2d_add_backward_op);
  m.impl("batch_norm", &sepconv::batch_norm_op);
  m.impl("batch_norm_backward", &sepconv::batch_norm_backward_op);
  m.impl("batch_norm_separable", &sepconv::batch_norm_separable_op);
  m.impl("batch_norm_separable_backward", &sepconv::batch_norm_separable_backward_op);
}

// The buffer cache's bookkeeping: no tensor arguments, so these take the CompositeExplicitAutograd
// key (any dispatch reaches them).
TORCH_LIBRARY_IMPL(sepconv_cpp, CompositeExplicitAutograd, m) {
  m.impl("cache_stats", [] { return sepconv::BufferCache::instance().stats(); });
  m.impl("empty_cache", [] { return sepconv::BufferCache::instance().release_idle(); });
}

// What this build runs and how it blocks, as "key=value;..." (kernels.cpp_backend.build_info reads
// it through ctypes): the ISA path compiled in (vec.h), its register tile, and the cache sizes read
// when the library loaded (machine.h) with the blocking chosen from them.
extern "C" __attribute__((visibility("default"))) const char* sepconv_cpu_build_info() {
  static const std::string info = [] {
    const sepconv::MachineConfig& config = sepconv::machine();
#if defined(SEPCONV_HAS_VEC)
    const int lanes = sepconv::VecF32::kLanes, tile_vectors = sepconv::kTileVectors;
#else
    const int lanes = 1, tile_vectors = 0;
#endif
    return std::string("isa=") + sepconv::kIsa + ";lanes=" + std::to_string(lanes) +
           ";tile_rows=" + std::to_string(sepconv::kRows) + ";tile_vectors=" + std::to_string(tile_vectors) +
           ";backward_block=" + std::to_string(sepconv::backward_block()) +
           ";l1d_bytes=" + std::to_string(config.l1d_bytes) + ";l1d_ways=" + std::to_string(config.l1d_ways) +
           ";l2_bytes=" + std::to_string(config.l2_bytes) +
           ";l3_bytes=" + std::to_string(config.l3_bytes) + ";cache_source=" + config.cache_source +
           ";tile_bytes=" + std::to_string(config.tile_bytes) + ";stream_bytes=" + std::to_string(config.stream_bytes) +
           ";l3_usable_bytes=" + std::to_string(config.l3_usable_bytes) +
           ";interleave_bytes=" + std::to_string(config.interleave_bytes) +
           ";stream_strided_rows=" + std::to_string(int(sepconv::stream_strided_rows()));
  }();
  return info.c_str();
}
