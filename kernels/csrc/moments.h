// Chan et al.'s update of per-column moments, shared by the BatchNorm kernel's statistics pass and the
// separable forward that gathers them for it (batch_norm_kernels.h, sepconv_kernels.h).
#pragma once

namespace sepconv {

// Folds a group of nb values with mean mean_b and sum of squared deviations m2_b into a group of na
// values (mean, m2).
inline void merge_moments(double na, double nb, double mean_b, double m2_b, double& mean, double& m2) {
  const double delta = mean_b - mean;
  mean += delta * (nb / (na + nb));
  m2 += m2_b + delta * delta * (na * nb / (na + nb));
}

}  // namespace sepconv
