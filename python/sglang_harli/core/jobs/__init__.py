"""Finetune jobs: the spec (``spec``), datasets (``data``), submission (``submission``), the job book and
its commands (``book``, ``control``), evaluation (``eval_data``, ``evaluation``), a running job as a work
source (``source``), publishing (``publishing``, ``adapters``) and durable state (``store``, ``staging``,
``paths``)."""
