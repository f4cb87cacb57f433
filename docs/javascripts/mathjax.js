window.MathJax = {
  tex: {inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true},
  options: {ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex"}
};
// Typeset again when Material shows a page. Not MathJax.startup.output.clearCache(): it drops the CSS
// that draws each character (mjx-c ... ::before) and the @font-face rules of the TeX fonts, and the
// next typeset does not add them back, so every formula came out as empty boxes of the right size.
document$.subscribe(() => {
  MathJax.startup.promise.then(() => {
    MathJax.typesetClear();
    MathJax.texReset();
    return MathJax.typesetPromise();
  });
});
