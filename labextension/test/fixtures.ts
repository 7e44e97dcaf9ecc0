/** A snapshot exactly as the comm contract describes it. */
export function goodState(): Record<string, unknown> {
  return {
    version: '0.1.0',
    model: {
      id: 'ipylora/tiny-llama',
      dtype: 'bfloat16',
      quantization: 'nf4',
      device: 'cuda:0',
      memory: '5.2 GiB'
    },
    datasets: [{ name: 'concepts', rows: 55 }],
    adapters: [
      { name: 'sd-prompts', active: true },
      { name: 'other', active: false }
    ],
    run: {
      name: 'sd-prompts',
      status: 'running',
      step: 120,
      total: 250,
      loss: [2.5, 1.9, null, 1.2],
      tokens_per_s: 3389.5,
      eta_s: 42
    }
  };
}
