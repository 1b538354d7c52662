"""KV pages lent to the trainer: the allocator mixin on SGLang's live allocator (``allocator``) and how
much is lent, when, and what happens when decode takes it back (``lending``)."""
