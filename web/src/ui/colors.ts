// One colour per socket type, for handles and links (ComfyUI's familiar ones; others hashed to a hue).
const KNOWN: Record<string, string> = {
  MODEL: "#b39ddb", CLIP: "#ffd500", VAE: "#ff6e6e", CONDITIONING: "#ffa931", LATENT: "#ff9cf9", IMAGE: "#64b5f6",
  MASK: "#81c784", INT: "#7ec8a9", FLOAT: "#a9d86e", STRING: "#9ccc65", BOOLEAN: "#4dd0e1", COMBO: "#90a4ae",
  CONTROL_NET: "#00d78d", SIGMAS: "#cdffcd", SAMPLER: "#ecb4b4", NOISE: "#b0b0b0", GUIDER: "#66ffff",
  UPSCALE_MODEL: "#cc99cc", CLIP_VISION: "#a8dadc", "*": "#cccccc",
};

export function typeColor(type: string): string {
  const key = type.split(",")[0].trim().toUpperCase();
  if (KNOWN[key]) return KNOWN[key];
  let hash = 0;
  for (const ch of key) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return `hsl(${hash % 360} 60% 65%)`;
}
