"""Quick evals on lm-evaluation-harness: the session's build (merge or parent) as an `lm_eval` LM
(`lm.py`), the quick suite and task loading (`suite.py`), standard errors and paired differences
(`paired.py`), and runs of a merge beside its parents on the same items, cached per model and task
(`runner.py`)."""
