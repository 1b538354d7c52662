"""What crosses a process boundary: the control messages between the HTTP side and the scheduler
(``control``) and the typed body of ``/harli/stats`` (``stats``, ``memory``). Nothing here imports torch,
peft or transformers, so reading a message never loads a model library (a test checks it)."""
