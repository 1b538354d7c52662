"""The fleet on the HTTP side: peer checks and adapter hand-over (``peers``), jobs placed across the fleet
(``placement``) and the admin-key peer routes (``routes``)."""
