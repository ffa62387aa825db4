"""Reports: Markdown + HTML (with plots) from benchmark runs and other sections (`document`), and
the ``report`` command (`cli`)."""
