"""Co-location: finetune work described as units (``work``), the two-stage latency predictor
(``predictor``, ``fits``), the QoS policies (``qos``), SM partitions (``partition``, ``green_contexts``),
device timing (``timing``), per-request TPOT (``tpot``), the plans the scheduler runs (``plan``), decode
step counters (``steps``), and the loop that owns the token-interval state (``loop.CoLocation``)."""
