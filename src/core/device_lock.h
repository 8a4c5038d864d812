// One caller at a time on the devices: whoever enqueues work on a device (a model's forward, the
// post-processing of its outputs) holds this. A backend's handles and stream serve one caller, and
// a forward being recorded as a graph must not take in another thread's ops.
#pragma once

#include <mutex>

namespace vf {

std::mutex& device_work_mutex();

}  // namespace vf
