"""What lies on disk or in a bucket: the run directory and where each artifact lives in it, content
digests, the corpus, fine-tuning and query readers, model and tokenizer loading, the run lock."""
