#include "keystore/store_limits.h"

#include <algorithm>
#include <numeric>

namespace hsmstek::keystore {

void ReloadBackoff::Failed(int64_t now, int64_t max_s) {
  delay_s_ =
      delay_s_ == 0 ? 1 : std::min(delay_s_ * 2, std::max<int64_t>(max_s, 1));
  retry_at_ = now + delay_s_;
}

bool DerivationBudget::Take(int64_t now) {
  if (now != second_) {
    second_ = now;
    used_ = 0;
  }
  if (used_ >= kMaxOldDerivationsPerSecond) return false;
  ++used_;
  return true;
}

std::vector<size_t> EvictionOrder(const std::vector<CachedEpoch> &entries,
                                  size_t keep) {
  if (entries.size() <= keep) return {};
  std::vector<size_t> order(entries.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return entries[a].epoch_start < entries[b].epoch_start;
  });
  std::vector<size_t> out;
  size_t remaining = entries.size();
  for (size_t i : order) {
    if (remaining <= keep) break;
    if (entries[i].pinned) continue;
    out.push_back(i);
    --remaining;
  }
  return out;
}

}  // namespace hsmstek::keystore
