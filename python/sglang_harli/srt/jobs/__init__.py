"""Jobs on the HTTP side: the ``/harli`` routes (``routes``) and the tokenizer manager's half of
publishing (``publisher``: an adapter version served under the job's name)."""
