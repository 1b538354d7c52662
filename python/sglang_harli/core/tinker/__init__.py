"""The Tinker API's engine-free half: futures and per-model order (``futures``), the protobuf messages
(``codec``), sessions (``sessions``), saved weights (``store``), the trainer of a training client
(``trainer``, ``params``) and the clients as work sources on the scheduler (``models``)."""
