"""`openmini eval TASK`: offline evaluations (NIAH, MMLU, IFEval, Graphwalks) against any
OpenAI-compatible server. One module per task; shared plumbing in `common` and `data`."""
