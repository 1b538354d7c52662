"""A fleet of instances: peers (``peers``), the adapter bundles they exchange (``bundles``), where a job
goes (``placement``), and one job trained on several instances (``group``, ``local_sgd``)."""
