//! Benchmarks only: see `benches/` (criterion) and `e2e/` (scripts against the kernel and peers).
//!
//! [`bench_frames`] is how the pipeline benches time a frame: besides criterion's time per
//! frame (frames per second per core), it counts the heap allocations one frame costs, which
//! must be zero on the forwarding fast paths (issue 10), and prints them beside the timing.
#![forbid(unsafe_code)]

use criterion::BenchmarkGroup;
use criterion::measurement::WallTime;

/// Frames run untimed to count allocations, after one warm-up frame.
const COUNTED_FRAMES: u64 = 10_000;

/// Heap allocations per call of `frame`, over [`COUNTED_FRAMES`] calls after a warm-up call.
pub fn allocations_per_frame(mut frame: impl FnMut()) -> f64 {
    frame();
    let info = allocation_counter::measure(|| {
        for _ in 0..COUNTED_FRAMES {
            frame();
        }
    });
    info.count_total as f64 / COUNTED_FRAMES as f64
}

/// Prints `name`'s allocations per frame, then benches `frame` with criterion.
pub fn bench_frames<O>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    mut frame: impl FnMut() -> O,
) {
    let allocations = allocations_per_frame(|| {
        std::hint::black_box(frame());
    });
    eprintln!("{name}: {allocations} heap allocations per frame");
    group.bench_function(name, |b| b.iter(&mut frame));
}
