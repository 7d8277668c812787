"""Benchmark evaluation: metrics (`blip2.eval.metrics`), standard annotation readers
(`blip2.eval.datasets`), and the runners behind `blip2 eval caption|vqa|retrieval`."""
