"""What the tests share: job data and HTTP helpers (``jobs``), the fake scheduler (``fake_scheduler``),
fleet instances (``fleet``), training data (``training``). Test files import from here, never from each
other."""
