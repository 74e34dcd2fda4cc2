# lme4/lmerTest reference for tests/lmm/test_dropped_columns.py: voxels whose observed rows
# leave X rank deficient, where lme4 drops columns ("fixed-effect model matrix is rank
# deficient so dropping k columns / coefficients") and fits the rest.
# 24 subjects in groups A, B, C (8 each) x visits at time 0, 1, 2; y1..y5 are five voxels:
#   y1 complete; y2 no image of group C; y3 group C seen at time 1 only;
#   y4 group B seen at time 0 only (and 6 other images missing); y5 group A alone;
#   y6 three subjects of group A at times 0 and 1: 6 observations, no more than the 6
#   columns of X, but more than the 2 it supports (lme4 fits it).
# Writes rank_deficient.csv (the data) and rank_deficient_lme4.json (per model and voxel:
# the kept coefficients and their estimates, vcov, logLik, sigma^2, theta; T and F contests
# of the test's contrasts on the kept coefficients, where their kept rows have full rank;
# lmerTest's type I anova of y ~ group; lmerTest's type III anova of group:time in
# y ~ group * time and of group in y ~ group + time, group a factor).  Best of bobyqa and Nelder_Mead by logLik.
# Run from the repository root: Rscript tests/lmm/make_rank_deficient.R
# (R 4.2.2, lme4 1.1-31, lmerTest 3.1-3, jsonlite 1.8.4)
suppressMessages({library(lme4); library(lmerTest); library(jsonlite)})
set.seed(1527)
d <- expand.grid(time = 0:2, subject = sprintf("s%02d", 1:24))[, c("subject", "time")]
d$group <- c("A", "B", "C")[(as.integer(factor(d$subject)) - 1) %/% 8 + 1]
u <- rnorm(24, sd = 1.2)[as.integer(factor(d$subject))]
shift <- c(A = 0, B = 0.8, C = -0.5)[d$group]
for (v in 1:6) d[[paste0("y", v)]] <- round(10 + shift + 0.4 * d$time + u + rnorm(nrow(d)), 6)
d$y2[d$group == "C"] <- NA
d$y3[d$group == "C" & d$time != 1] <- NA
d$y4[d$group == "B" & d$time != 0] <- NA
d$y4[c(2, 4, 7, 9, 50, 70)] <- NA
d$y5[d$group != "A"] <- NA
d$y6[!(d$subject %in% c("s01", "s02", "s03") & d$time < 2)] <- NA
write.csv(d[, c("subject", "time", "group", paste0("y", 1:6))], "tests/lmm/rank_deficient.csv", row.names = FALSE, quote = FALSE, na = "")

# X as numbers, as mpiblmm gets it: a group unseen at a voxel leaves zero columns, which
# lme4 drops (a factor would lose the level in model.frame, and lme4 refuses a factor
# with one level left, as at y5)
d$gB <- as.numeric(d$group == "B"); d$gC <- as.numeric(d$group == "C")
coefs <- c("(Intercept)", "gB", "gC", "time", "gB:time", "gC:time")
contrasts <- list(time = rbind(c(0, 0, 0, 1, 0, 0)), gC = rbind(c(0, 0, 1, 0, 0, 0)),
                  C_at_1 = rbind(c(0, 0, 1, 0, 0, 1)),
                  interaction = rbind(c(0, 0, 0, 0, 1, 0), c(0, 0, 0, 0, 0, 1)))
best <- function(formula, data, reml) {
  fits <- lapply(c("bobyqa", "Nelder_Mead"), function(opt) suppressMessages(
    lmer(formula, data = data, REML = reml, control = lmerControl(optimizer = opt))))
  fits[[which.max(sapply(fits, function(f) as.numeric(logLik(f))))]]
}
summarise <- function(m) list(
  kept = names(fixef(m)), beta = unname(fixef(m)), vcov = unname(as.matrix(vcov(m))),
  logLik = as.numeric(logLik(m)), sigma2 = sigma(m)^2, theta = unname(getME(m, "theta")))
out <- list()
for (reml in c(TRUE, FALSE)) for (v in 1:6) {
  data <- d[!is.na(d[[paste0("y", v)]]), ]
  m <- best(as.formula(paste0("y", v, " ~ gB + gC + time + gB:time + gC:time + (1 | subject)")), data, reml)
  r <- summarise(m)
  kept <- match(r$kept, coefs)
  for (name in names(contrasts)) {
    L <- contrasts[[name]][, kept, drop = FALSE]
    if (qr(L)$rank < nrow(L)) next
    if (nrow(L) == 1) {
      ct <- contest(m, L[1, ], joint = FALSE)
      r$contrasts[[name]] <- list(estimate = ct$Estimate, se = ct$`Std. Error`,
                                  df = ct$df, t = ct$`t value`, p = ct$`Pr(>|t|)`)
    } else {
      ct <- contest(m, L, joint = TRUE)
      r$contrasts[[name]] <- list(F = ct$`F value`, df_num = ct$NumDF, df_den = ct$DenDF,
                                  p = ct$`Pr(>F)`)
    }
  }
  out[[paste0(if (reml) "REML" else "ML", "_y", v)]] <- r
}
for (v in 1:4) {  # one term: lmerTest's type I anova of the kept columns of the term
  data <- d[!is.na(d[[paste0("y", v)]]), ]
  m <- best(as.formula(paste0("y", v, " ~ group + (1 | subject)")), data, TRUE)
  r <- summarise(m)
  a <- anova(m, type = 1)
  if ("group" %in% rownames(a)) r$type1 <- list(F = a["group", "F value"],
    df_num = a["group", "NumDF"], df_den = a["group", "DenDF"], p = a["group", "Pr(>F)"])
  out[[paste0("group_y", v)]] <- r
}
# lmerTest's anova (type III, its default) of the same data with group a factor, as a user
# of lme4 fits each voxel's observed rows (lme4 drops an unused level, and the columns the
# rest leave dependent): a term contained in no other is tested by its kept columns, so
# group:time and group (the groups at time 0: time is numeric) of y ~ group * time and group
# of y ~ group + time (1 numerator df where one of their two columns is gone).  y5 and y6 see
# group A alone: lme4 refuses a one-level factor.
anova_row <- function(a, term) if (term %in% rownames(a)) list(F = a[term, "F value"],
  df_num = a[term, "NumDF"], df_den = a[term, "DenDF"], p = a[term, "Pr(>F)"])
d$group <- factor(d$group)
for (reml in c(TRUE, FALSE)) for (v in 1:4) {
  data <- d[!is.na(d[[paste0("y", v)]]), ]
  y <- paste0("y", v)
  m <- best(as.formula(paste(y, "~ group * time + (1 | subject)")), data, reml)
  out[[paste0("anova_", if (reml) "REML" else "ML", "_y", v)]] <- list(
    interaction = anova_row(anova(m), "group:time"), group = anova_row(anova(m), "group"),
    additive = anova_row(anova(best(as.formula(paste(y, "~ group + time + (1 | subject)")),
                                    data, reml)), "group"))
}
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE),
           "tests/lmm/rank_deficient_lme4.json")
