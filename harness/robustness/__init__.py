"""The robustness matrix: the catalogue of malformed inputs (`inputs`), isolated child processes
(`runner`), classification and the results document (`matrix`), rendering (`render`) and the
``robustness`` command (`cli`)."""
